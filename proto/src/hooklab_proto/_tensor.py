"""The tensor frame: one msgpack map per tensor whose payload the encoder never copies.

Layout (see proto/README.md for the normative text)::

    {"kind": "tensor", "v": 1, "name": str, "dtype": str, "shape": [int, ...],
     "pad": bin8, "data": bin32}

``data`` is always last and always bin32, so the map is a small header followed by the tensor's
raw little-endian bytes; ``pad`` makes ``data`` start at a multiple of 64 bytes from the start of
the map.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

import msgspec
import torch

from ._buffers import ALIGNMENT, Buffer, tensor_bytes
from ._dtypes import dtype_code, torch_dtype
from .errors import WireFormatError

FORMAT_VERSION = 1
MAX_BIN32 = 2**32 - 1
MAX_NDIM = 64

if sys.byteorder != "little":  # pragma: no cover - torch has no big-endian CPU builds we target
    raise ImportError("hooklab_proto requires a little-endian host")

_pack = msgspec.msgpack.encode
# What msgspec raises on malformed input: structural errors, and invalid UTF-8 in strings.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)
_KEY_PAD = _pack("pad")
_KEY_DATA = _pack("data")


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded msgpack map: a small ``header`` followed by an uncopied ``payload``."""

    header: bytes
    payload: memoryview

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.payload.nbytes

    def to_bytes(self) -> bytes:
        """The whole map as one bytes object (copies; for tests and small frames)."""
        return self.header + self.payload.tobytes()


def _payload_view(tensor: torch.Tensor) -> memoryview:
    """A byte view of ``tensor``'s elements in C order; copies only when the tensor is not already
    a contiguous CPU tensor (the single copy the format allows)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # numpy has no bfloat16/float8; reinterpreting as bytes first works for every dtype.
    return flat.view(torch.uint8).numpy().data  # the same memoryview as memoryview(array)


def encode_tensor(tensor: torch.Tensor, name: str = "") -> EncodedFrame:
    """Encode ``tensor`` as a tensor map. The payload is a view of the tensor's memory."""
    code = dtype_code(tensor.dtype)
    payload = _payload_view(tensor)
    if payload.nbytes > MAX_BIN32:
        raise WireFormatError(
            f"tensor {name!r} has {payload.nbytes} bytes; one frame holds at most {MAX_BIN32}"
        )
    head = b"".join(
        (
            b"\x87",  # fixmap with 7 entries
            _pack("kind"), _pack("tensor"),
            _pack("v"), _pack(FORMAT_VERSION),
            _pack("name"), _pack(name),
            _pack("dtype"), _pack(code),
            _pack("shape"), _pack(list(tensor.shape)),
            _KEY_PAD,
        )
    )  # fmt: skip
    # bin8 marker + length byte, then the "data" key, then the bin32 marker + 4-byte length.
    data_offset_without_pad = len(head) + 2 + len(_KEY_DATA) + 5
    pad = -data_offset_without_pad % ALIGNMENT
    header = b"".join(
        (
            head,
            bytes((0xC4, pad)),
            bytes(pad),
            _KEY_DATA,
            b"\xc6",
            struct.pack(">I", payload.nbytes),
        )
    )
    return EncodedFrame(header, payload)


class _TensorMap(msgspec.Struct):
    kind: str
    v: int
    name: str
    dtype: str
    shape: list[int]
    data: memoryview
    pad: bytes = b""


_tensor_decoder = msgspec.msgpack.Decoder(_TensorMap)


def decode_tensor(buffer: Buffer) -> tuple[str, torch.Tensor]:
    """Decode a tensor map into ``(name, tensor)``; the tensor views ``buffer`` (no copy) unless
    ``buffer`` is read-only, in which case it is copied once."""
    buffer = tensor_bytes(memoryview(buffer))
    try:
        frame = _tensor_decoder.decode(buffer)
    except DECODE_ERRORS as exc:
        raise WireFormatError(f"malformed tensor frame: {exc}") from None
    if frame.v != FORMAT_VERSION:
        raise WireFormatError(
            f"tensor frame version {frame.v} is not supported; expected {FORMAT_VERSION}"
        )
    dtype = torch_dtype(frame.dtype)
    shape = frame.shape
    if len(shape) > MAX_NDIM or any(size < 0 for size in shape):
        raise WireFormatError(
            f"tensor {frame.name!r}: shape {shape} must be at most {MAX_NDIM} non-negative sizes"
        )
    expected = math.prod(shape) * dtype.itemsize
    if expected != frame.data.nbytes:
        raise WireFormatError(
            f"tensor {frame.name!r}: shape {shape} of {frame.dtype} needs {expected} bytes, "
            f"the frame carries {frame.data.nbytes}"
        )
    if expected == 0:
        return frame.name, torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(frame.data, dtype=dtype).reshape(shape)
    if dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
        raise WireFormatError(f"tensor {frame.name!r}: BOOL bytes must be 0 or 1")
    return frame.name, tensor
