"""Frames: the tensor map plus the ``begin``/``end``/``error`` control maps of a stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from ._buffers import Buffer
from ._tensor import DECODE_ERRORS, EncodedFrame, decode_tensor
from .errors import WireFormatError

CONTROL_KINDS = ("begin", "end", "error")


@dataclass(frozen=True, slots=True)
class TensorFrame:
    name: str
    tensor: torch.Tensor
    kind: str = "tensor"


@dataclass(frozen=True, slots=True)
class ControlFrame:
    kind: str  # "begin" | "end" | "error"
    fields: dict[str, Any] = field(default_factory=dict)


Frame = TensorFrame | ControlFrame

_ERROR_FIELDS_MESSAGE = "an error frame needs string 'code' and 'message' fields"


def _has_error_fields(fields: dict[str, Any]) -> bool:
    return isinstance(fields.get("code"), str) and isinstance(fields.get("message"), str)


def encode_control(kind: str, **fields: Any) -> EncodedFrame:
    """Encode a control map; ``kind`` comes first so a reader can dispatch on it cheaply."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control frame kind must be one of {CONTROL_KINDS}, not {kind!r}")
    if kind == "error" and not _has_error_fields(fields):
        raise ValueError(_ERROR_FIELDS_MESSAGE)
    header = msgspec.msgpack.encode({"kind": kind, **fields})
    return EncodedFrame(header, memoryview(b""))


class _Kind(msgspec.Struct):
    kind: str


def _reject_ext(code: int, data: memoryview) -> Any:
    raise WireFormatError(f"msgpack extension types are not allowed (found ext type {code})")


_kind_decoder = msgspec.msgpack.Decoder(_Kind)
_control_decoder = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_reject_ext)


def decode_frame(buffer: Buffer) -> Frame:
    """Decode one msgpack map (without its length prefix) into a frame.

    A tensor frame's tensor views ``buffer`` when it is writable.
    """
    try:
        kind = _kind_decoder.decode(buffer).kind
    except DECODE_ERRORS as exc:
        raise WireFormatError(
            f"a frame must be a msgpack map with a string 'kind': {exc}"
        ) from None
    if kind == "tensor":
        name, tensor = decode_tensor(buffer)
        return TensorFrame(name, tensor)
    if kind not in CONTROL_KINDS:
        raise WireFormatError(
            f"unknown frame kind {kind!r}; expected 'tensor' or one of {CONTROL_KINDS}"
        )
    try:
        fields = _control_decoder.decode(buffer)
    except DECODE_ERRORS as exc:
        raise WireFormatError(f"malformed {kind!r} frame: {exc}") from None
    del fields["kind"]
    if kind == "error" and not _has_error_fields(fields):
        raise WireFormatError(_ERROR_FIELDS_MESSAGE)
    return ControlFrame(kind, fields)
