"""OpenAI-compatible bodies: ``POST /v1/completions`` and ``POST /v1/chat/completions``, their
responses and their streamed chunks, plus the ``hooks`` extension (the hook specs of
/v1/generate). Fields OpenAI defines keep its names, defaults and meanings; the server turns a
request into a GenerateRequest (proto/README.md, "OpenAI-compatible routes")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ._api import HookSpecs, ModelName
from ._base import Body
from ._generate import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, StopString
from ._limits import bounded_ids

MAX_CHOICES = 128  # n's own bound; the server's max_batch bounds prompts x n
MAX_MESSAGES = 1024  # the server's max_text_chars bounds their text
FinishReason = Literal["stop", "length"]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None
Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]], bounded_ids("max_tokens", "prompt tokens")
]


class StreamOptions(Body):
    include_usage: bool = Field(False, description="a last chunk with usage and no choices")


class _Generation(Body):
    """What both routes share: OpenAI's sampling and stopping fields, and ``hooks``."""

    model: ModelName = Field(None, description="which served model (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    stream: bool = Field(False, description="server-sent events: chunks, then 'data: [DONE]'")
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="strings that end a choice; its text stops before them")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="the same seed and request give the same tokens"
    )
    frequency_penalty: float = Field(0.0, description="only 0 (not supported)")
    presence_penalty: float = Field(0.0, description="only 0 (not supported)")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    hooks: HookSpecs = Field(
        default_factory=list,
        description="hooklab extension: hook specs (steer, ablate, …) active at every step, as "
        "in /v1/generate; batch rows are prompts x n, choice by choice",
    )

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError(
                "penalties are not supported (OpenAI's differ from TransformerLens's "
                "freq_penalty); send 0, or use /v1/generate's freq_penalty"
            )
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Generation):
    """``POST /v1/completions``: continue each prompt (text, texts, ids or rows of ids)."""

    prompt: Prompt = Field(description="tokenised as /v1/generate does (the model's BOS rule)")
    max_tokens: int = Field(16, ge=1, description="new tokens per choice at most")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (0: only its own)"
    )


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
    name: str | None = Field(None, max_length=256)

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``: the messages through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="new tokens per choice at most; default: what the context leaves"
    )
    max_tokens: int | None = Field(None, ge=1, description="the older name of the same")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("send max_completion_tokens or max_tokens, not both")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt counted once, whatever n is")
    completion_tokens: int = Field(description="tokens generated for every choice, eos included")
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int] = Field(description="where each token's text begins in the choice's")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A completion; streamed, each chunk is one of these with the choices' new text."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="UTF-8 of the token decoded alone")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
