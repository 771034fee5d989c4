"""Request and response bodies of the HTTP API (JSON or msgpack, same schema)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._specs import HookSpec
from ._tensor_values import JsonTensor, MsgpackTensor, TensorValue

JSON_MEDIA_TYPE = "application/json"
MSGPACK_MEDIA_TYPE = "application/msgpack"
FRAMES_MEDIA_TYPE = "application/vnd.hooklab.frames+msgpack"

# Names of the non-activation tensors in a response stream or JSON body.
OUTPUT_LOGITS = "output.logits"
OUTPUT_LOSS = "output.loss"
OUTPUT_RESIDUAL = "output.residual"

TokenInput = str | list[str] | list[int] | list[list[int]] | TensorValue


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed body, wrong content type
    VALIDATION = "validation_error"  # well-formed but a field is invalid
    UNKNOWN_HOOK = "unknown_hook"
    BAD_INDEX = "bad_index"
    BAD_SHAPE = "bad_shape"
    CONFLICT = "conflicting_specs"
    TOO_LARGE = "too_large"  # over a token, batch, body or response limit
    NOT_FOUND = "not_found"
    STORE_FULL = "store_full"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INTERNAL = "internal"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    hint: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ForwardRequest(_Body):
    """TransformerLens ``forward`` arguments, plus hook specs active during this call."""

    input: TokenInput | None = Field(None, description="text, texts, or token ids [batch, pos]")
    residual: TensorValue | None = Field(
        None, description="residual stream [batch, pos, d_model] to start from (start_at_layer)"
    )
    tokens: list[list[int]] | TensorValue | None = Field(
        None, description="token ids for the loss when starting from a residual"
    )
    return_type: Literal["logits", "loss", "both"] | None = "logits"
    loss_per_token: bool = False
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None
    attention_mask: list[list[int]] | TensorValue | None = None
    start_at_layer: int | None = None
    stop_at_layer: int | None = None
    hooks: list[HookSpec] = Field(default_factory=list)


class RunWithCacheRequest(ForwardRequest):
    """``run_with_cache``: the forward plus the activations at ``names``."""

    names: list[str] | None = Field(
        None, description="exact hook names to cache; null caches every hook point that fires"
    )
    remove_batch_dim: bool = False
    store: bool = Field(False, description="keep the cache on the server and return its id")
    return_cache: bool = Field(True, description="send the activations back")


class RunWithHooksRequest(RunWithCacheRequest):
    """``run_with_hooks``: a forward with hook specs; caches nothing unless ``names`` is given."""

    names: list[str] | None = Field(default_factory=list)


class TokenizeRequest(_Body):
    input: str | list[str]
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[list[int]]
    attention_mask: list[list[int]]
    str_tokens: list[list[str]]


class DetokenizeRequest(_Body):
    tokens: list[int] | list[list[int]]


class DetokenizeResponse(BaseModel):
    text: str | list[str]


class StoreTensorRequest(_Body):
    tensor: MsgpackTensor | JsonTensor
    ttl_s: float | None = Field(None, gt=0, description="seconds to keep it (capped by the server)")


class StoredObject(BaseModel):
    id: str
    kind: Literal["tensor", "cache"]
    nbytes: int
    expires_at: float = Field(description="Unix time after which the object is gone")
    dtype: str | None = None
    shape: list[int] | None = None
    names: list[str] | None = None


class HookPointInfo(BaseModel):
    name: str
    shape: list[str | int] = Field(description="symbolic shape, e.g. ['batch', 'pos', 'd_model']")
    fires_by_default: bool


class TokenizerInfo(BaseModel):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    padding_side: str
    prepends_bos: bool
    files: list[str]


class Limits(BaseModel):
    max_tokens: int
    max_batch: int
    max_request_bytes: int
    max_response_bytes: int
    max_stored_bytes: int
    store_ttl_s: float


class ModelInfo(BaseModel):
    model_name: str
    cfg: dict[str, Any]
    hook_points: list[HookPointInfo]
    tokenizer: TokenizerInfo | None
    limits: Limits
