"""Tensors inside request bodies: a JSON tensor, a msgpack tensor map, or a stored-tensor ref."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

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


TensorValue = Annotated[TensorRef | MsgpackTensor | JsonTensor, Field(union_mode="left_to_right")]


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
