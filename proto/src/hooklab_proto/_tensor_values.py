"""Tensors inside request bodies: a JSON tensor, a msgpack tensor map, or a stored-tensor ref."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ._base import Body
from ._dtypes import torch_dtype
from ._json import tensor_from_json
from ._tensor import MAX_NDIM
from .errors import WireFormatError

# The largest size of one axis; larger shapes (even with a zero elsewhere) are refused.
MAX_AXIS = 2**31 - 1
Shape = Annotated[list[Annotated[int, Field(ge=0, le=MAX_AXIS)]], Field(max_length=MAX_NDIM)]


class JsonTensor(Body):
    """``{"dtype", "shape", "data"}``: data nested like shape, or flat in C order."""

    dtype: str
    shape: Shape
    data: Any


class MsgpackTensor(BaseModel):
    """A tensor map inside a msgpack request body (proto/README.md §1)."""

    model_config = ConfigDict(strict=True)
    kind: Literal["tensor"]
    v: int = 1
    name: str = ""
    dtype: str
    shape: Shape
    pad: bytes = b""
    data: bytes


class TensorRef(Body):
    """A tensor stored earlier with ``POST /v1/tensors``."""

    ref: str = Field(min_length=1, max_length=128)


def _tensor_form(value: Any) -> str:
    """Which form a tensor value takes: a stored ref, a msgpack tensor map, or JSON."""
    if isinstance(value, dict):
        return "ref" if "ref" in value else "msgpack" if "kind" in value else "json"
    if isinstance(value, TensorRef):
        return "ref"
    return "msgpack" if isinstance(value, MsgpackTensor) else "json"


# Dispatching on the keys present makes errors name the one form meant, not all three.
InlineTensor = Annotated[
    Annotated[MsgpackTensor, Tag("msgpack")] | Annotated[JsonTensor, Tag("json")],
    Discriminator(_tensor_form),
]
TensorValue = Annotated[
    Annotated[TensorRef, Tag("ref")]
    | Annotated[MsgpackTensor, Tag("msgpack")]
    | Annotated[JsonTensor, Tag("json")],
    Discriminator(_tensor_form),
]


def inline_tensor(value: JsonTensor | MsgpackTensor) -> torch.Tensor:
    """The torch tensor an inline value describes; raises WireFormatError when malformed."""
    if isinstance(value, JsonTensor):
        return tensor_from_json(value.model_dump())
    if value.v != 1:
        raise WireFormatError(f"tensor version {value.v} is not supported; expected 1")
    dtype = torch_dtype(value.dtype)
    if any(size < 0 for size in value.shape):
        raise WireFormatError(f"shape {value.shape} has a negative size")
    expected = dtype.itemsize
    for size in value.shape:
        expected *= size
    if expected != len(value.data):
        raise WireFormatError(
            f"shape {value.shape} of {value.dtype} needs {expected} bytes, got {len(value.data)}"
        )
    if expected == 0:
        return torch.empty(value.shape, dtype=dtype)
    return torch.frombuffer(bytearray(value.data), dtype=dtype).reshape(value.shape)
