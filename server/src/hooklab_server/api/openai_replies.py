"""OpenAI's response and chunk bodies from choice updates: ``text_completion`` objects for
/v1/completions (streamed as the same object with each choice's new text), ``chat.completion``
and ``chat.completion.chunk`` for /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from hooklab_proto import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

from ..ops.openai_choices import ChoiceUpdate, ScoredToken


@dataclass(frozen=True)
class Reply:
    """What every body of one answer shares: its id, creation time and model, and whether
    log-probabilities were asked for."""

    id: str
    model: str
    chat: bool
    logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def to(cls, request_id: str | None, model: str, chat: bool, logprobs: bool) -> Reply:
        # Named after the request id, so an answer's id finds the server's log lines.
        name = f"{'chatcmpl' if chat else 'cmpl'}-{request_id or uuid.uuid4().hex}"
        return cls(name, model, chat, logprobs)

    def response(
        self, updates: Sequence[ChoiceUpdate], usage: Usage
    ) -> Completion | ChatCompletion:
        if not self.chat:
            return self._completion(updates, usage)
        choices = [
            ChatChoice(
                index=update.index,
                message=AssistantMessage(content=update.text),
                logprobs=self._chat_logprobs(update.logprobs),
                finish_reason=update.finish_reason or "length",  # set: choices finished
            )
            for update in updates
        ]
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunk(
        self, updates: Sequence[ChoiceUpdate], usage: Usage | None = None
    ) -> Completion | ChatCompletionChunk:
        """A streamed chunk: each choice's new text (no choices, with the usage, at the end)."""
        if not self.chat:
            return self._completion(updates, usage)
        choices = [
            ChatChunkChoice(
                index=update.index,
                delta=ChatDelta(content=update.text),
                logprobs=self._chat_logprobs(update.logprobs),
                finish_reason=update.finish_reason,
            )
            for update in updates
        ]
        return self._chat_chunk(choices, usage)

    def _completion(self, updates: Sequence[ChoiceUpdate], usage: Usage | None) -> Completion:
        """A completion answer or chunk (the same shape in OpenAI's protocol)."""
        return Completion(
            id=self.id, created=self.created, model=self.model,
            choices=[self._completion_choice(update) for update in updates], usage=usage,
        )  # fmt: skip

    def opening_chunk(self, choices: int) -> ChatCompletionChunk:
        """A chat stream's first chunk: the assistant's role for every choice (as OpenAI)."""
        deltas = [
            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            for index in range(choices)
        ]
        return self._chat_chunk(deltas, None)

    def _chat_chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _completion_choice(self, update: ChoiceUpdate) -> CompletionChoice:
        logprobs = None
        if self.logprobs:
            scored = update.logprobs
            logprobs = CompletionLogprobs(
                tokens=[token.token for token in scored],
                token_logprobs=[token.logprob for token in scored],
                top_logprobs=[dict(token.top) for token in scored],
                text_offset=[token.offset for token in scored],
            )
        return CompletionChoice(
            index=update.index,
            text=update.text,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
        )

    def _chat_logprobs(self, scored: list[ScoredToken]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    token=token.token,
                    logprob=token.logprob,
                    bytes=list(token.token.encode()),
                    top_logprobs=[
                        TopLogprob(token=text, logprob=value, bytes=list(text.encode()))
                        for text, value in token.top
                    ],
                )
                for token in scored
            ]
        )
