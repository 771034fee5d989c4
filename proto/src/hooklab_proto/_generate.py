"""Request and response bodies of ``POST /v1/generate`` and its server-sent events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, RootModel

from ._api import ErrorResponse, HookSpecs, ModelName, Timeout, TokenInput
from ._base import Body
from ._limits import bounded_length
from ._saes import SaeIds

EVENT_TOKEN = "token"  # one per step: GenerateStep
EVENT_DONE = "done"  # last, on success: GenerateResponse
EVENT_ERROR = "error"  # last, on failure: ErrorResponse

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # alternatives per step (OpenAI's chat allows 20)
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerateRequest(Body):
    """TransformerLens ``generate`` arguments, plus hook specs active at every step.

    The fields keep TransformerLens's names, defaults and order; the server groups them into
    sampling and stopping parameters.
    """

    model: ModelName = None
    input: TokenInput = Field("", description="a prompt, a list of prompts, or token ids")
    max_new_tokens: int = Field(10, ge=0, description="capped by the model's context")
    stop_at_eos: bool = True
    eos_token_id: Annotated[
        int | list[int] | None, bounded_length("max_selector_length", "stop ids")
    ] = Field(None, description="stop id(s), in the vocabulary; default: the tokenizer's eos")
    do_sample: bool = True
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    temperature: float = Field(1.0, ge=0.0, description="0 is greedy")
    freq_penalty: float = Field(
        0.0, ge=-1e4, le=1e4, description="subtracted per earlier occurrence (TransformerLens)"
    )
    use_past_kv_cache: bool = True
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None
    return_type: Literal["input", "str", "tokens", "embeds"] = "input"
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="seed for reproducible sampling")
    stop: list[StopString] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description="a row ends once its new text holds one of these (beyond TransformerLens; "
        "the text keeps it, and the row is padded from then on, as after eos)",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with each step, the new tokens' log-probabilities and this many most "
        "likely alternatives (log-softmax of the logits, hooks applied, before temperature "
        "and top-k/p); null: none",
    )
    stream: bool = Field(False, description="send tokens as server-sent events as they come")
    hooks: HookSpecs = Field(default_factory=list)
    saes: SaeIds = Field(default_factory=list)
    timeout_s: Timeout = None


class TokenLogprobs(BaseModel):
    """One row's new token: its log-probability and the most likely alternatives."""

    logprob: float
    top_ids: list[int] = Field(description="the most likely tokens, most likely first")
    top_logprobs: list[float]


class GenerateStep(BaseModel):
    step: int
    tokens: list[int] = Field(description="the new token of each batch row")
    text: list[str] = Field(description="each new token decoded")
    logprobs: list[TokenLogprobs] | None = Field(
        None, description="per batch row, when the request asked for logprobs"
    )


class GenerateStats(BaseModel):
    new_tokens: int
    seconds: float
    tokens_per_s: float
    queued_s: float = Field(0.0, description="time waiting for the device before the first step")
    units_waited: int = Field(
        0, description="units of other requests the device ran before this one's first"
    )


class GenerateResponse(BaseModel):
    tokens: list[list[int]] = Field(description="prompt and new tokens, [batch, pos]")
    text: list[str] | None = Field(None, description="decoded rows, special tokens skipped")
    output: str | list[str] | list[list[int]] | list[list[list[float]]] = Field(
        description="what TransformerLens's generate returns for return_type (embeds: the "
        "token embeddings of prompt and new tokens, [batch, pos, d_model])"
    )
    stats: GenerateStats
    logprobs: list[list[TokenLogprobs]] | None = Field(
        None, description="[batch, new tokens], when the request asked for logprobs"
    )


# --- the server-sent events of a streamed generation ----------------------------------------


class TokenEvent(BaseModel):
    """``event: token``, one per step."""

    event: Literal["token"] = "token"  # EVENT_TOKEN
    data: GenerateStep


class DoneEvent(BaseModel):
    """``event: done``, the last on success."""

    event: Literal["done"] = "done"  # EVENT_DONE
    data: GenerateResponse


class ErrorEvent(BaseModel):
    """``event: error``, the last on a failure after the stream started."""

    event: Literal["error"] = "error"  # EVENT_ERROR
    data: ErrorResponse


class GenerateEvent(
    RootModel[Annotated[TokenEvent | DoneEvent | ErrorEvent, Field(discriminator="event")]]
):
    """One server-sent event of ``POST /v1/generate`` with ``stream``: ``event: {event}`` then
    ``data: {data as one line of JSON}`` and a blank line."""

    def encoded(self) -> bytes:
        event = self.root
        return f"event: {event.event}\ndata: {event.data.model_dump_json()}\n\n".encode()
