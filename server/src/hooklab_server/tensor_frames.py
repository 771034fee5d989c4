"""A result's named tensors as a proto frame stream, and back: what the API sends clients, and
what a worker sends the API through Redis (which the API passes on without decoding when the
client wants frames)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import (
    ControlFrame,
    EncodedFrame,
    TensorFrame,
    encode_control,
    encode_tensor,
    read_stream,
    stream_chunks,
)

from .ops import TensorsResult

SMALL_BYTES = 64 * 1024  # chunks below this are gathered (headers, small tensors)


def encode_frames(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[EncodedFrame]:
    """begin, one frame per tensor (payloads are views, no copy on the CPU), end."""
    started = time.perf_counter()
    frames = [
        encode_control("begin", n_tensors=len(tensors), **meta),
        *(encode_tensor(tensor, name) for name, tensor in tensors.items()),
    ]
    total_bytes = sum(frame.payload.nbytes for frame in frames)
    stats = {"tensor_bytes": total_bytes, "encode_s": time.perf_counter() - started}
    frames.append(encode_control("end", stats=stats))
    return frames


def stream_pieces(frames: list[EncodedFrame], piece_bytes: int) -> Iterator[bytes | memoryview]:
    """The frame stream in pieces of at most ``piece_bytes``: tensor payloads as views of the
    tensors (no copy), headers and small payloads gathered into one piece."""
    pending = bytearray()
    for chunk in stream_chunks(frames):
        if len(chunk) < SMALL_BYTES:
            pending += chunk
            continue
        if pending:
            yield bytes(pending)
            pending = bytearray()
        view = memoryview(chunk).cast("B")
        for start in range(0, len(view), piece_bytes):
            yield view[start : start + piece_bytes]
    if pending:
        yield bytes(pending)


@dataclass
class StreamedTensors:
    """A result whose frame stream (``nbytes`` long) is still arriving from a worker."""

    nbytes: int
    pieces: AsyncGenerator[bytes, None]

    async def collected(self) -> EncodedTensors:
        async with contextlib.aclosing(self.pieces) as pieces:
            return EncodedTensors([piece async for piece in pieces])


@dataclass
class EncodedTensors:
    """A :class:`TensorsResult` as the frame stream a worker made of it."""

    pieces: list[bytes]

    def decoded(self) -> TensorsResult:
        meta: dict[str, object] = {}
        tensors: dict[str, torch.Tensor] = {}
        for frame in read_stream(self.pieces):
            if isinstance(frame, TensorFrame):
                tensors[frame.name] = frame.tensor
            elif isinstance(frame, ControlFrame) and frame.kind == "begin":
                meta = {k: v for k, v in frame.fields.items() if k != "n_tensors"}
        return TensorsResult(tensors, meta)
