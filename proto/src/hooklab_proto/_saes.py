"""Sparse autoencoders a key uploads (``POST /v1/saes``) and names in its requests.

An upload is SAELens's saved format: ``cfg.json``'s text (or the object it holds) and the bytes
of ``sae_weights.safetensors`` — msgpack ``bin`` in a msgpack body, base64 text in a JSON body
(what ``curl`` sends: ``"weights": "$(base64 -w0 sae_weights.safetensors)"``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from ._base import Body

SAE_ID_PREFIX = "sae_"
MAX_REQUEST_SAES = 8  # uploaded SAEs one request may attach


def _bytes_or_base64(value: Any) -> Any:
    """msgpack bin arrives as bytes; JSON can only carry text: base64 (standard alphabet)."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise PydanticCustomError(
                "bytes_type", "weights in a JSON body must be base64 text"
            ) from None
    return value


SaeId = Annotated[str, Field(min_length=1, max_length=128)]
SaeIds = Annotated[
    list[SaeId],
    Field(
        max_length=MAX_REQUEST_SAES,
        description="uploaded SAEs (POST /v1/saes ids) attached for this request only: their "
        "points '{hook}.hook_sae_input' … 'hook_sae_output' can be hooked and cached",
    ),
]


class SaeUploadRequest(Body):
    model: Annotated[str | None, Field(max_length=256)] = Field(
        None, description="the served model whose hook point the SAE reads (default: the first)"
    )
    cfg: str | dict[str, Any] = Field(
        description="SAELens's cfg.json: its text, or the object it holds"
    )
    # Described as JSON sends it (base64 text); a msgpack body sends the same field as bin.
    weights: Annotated[
        bytes,
        BeforeValidator(_bytes_or_base64),
        WithJsonSchema({"type": "string", "format": "byte"}),
    ] = Field(description="sae_weights.safetensors: base64 text in JSON, bin in msgpack")
    hook: Annotated[str | None, Field(max_length=256)] = Field(
        None, description="the hook point it reads (default: the config's hook_name)"
    )
    ttl_s: float | None = Field(None, gt=0, description="seconds to keep it (capped by the server)")


class SaeInfo(BaseModel):
    id: str
    hook: str = Field(description="the hook point it reads")
    d_in: int
    d_sae: int
    architecture: str
    nbytes: int = Field(description="its weights' bytes (they count in the key's stored_bytes)")
    expires_at: float = Field(description="Unix time after which it is gone")
    owner: str = Field(description="the name of the key that uploaded it")


class SaeList(BaseModel):
    saes: list[SaeInfo]
