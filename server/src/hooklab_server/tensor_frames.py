"""A result's named tensors as a proto frame stream, and back: what the API sends clients, and
what a worker sends the API through Redis (which the API passes on without decoding when the
client wants frames)."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


def stream_pieces(result: TensorsResult, piece_bytes: int) -> Iterator[bytes]:
    """The result's frame stream in pieces of about ``piece_bytes`` (the last one shorter)."""
    pending = bytearray()
    for chunk in stream_chunks(encode_frames(result.meta, result.tensors)):
        pending += chunk
        while len(pending) >= piece_bytes:
            yield bytes(pending[:piece_bytes])
            del pending[:piece_bytes]
    if pending:
        yield bytes(pending)


@dataclass
class EncodedTensors:
    """A :class:`TensorsResult` as the frame stream a worker made of it."""

    pieces: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def decoded(self) -> TensorsResult:
        meta: dict[str, object] = {}
        tensors: dict[str, torch.Tensor] = {}
        for frame in read_stream(self.pieces):
            if isinstance(frame, TensorFrame):
                tensors[frame.name] = frame.tensor
            elif isinstance(frame, ControlFrame) and frame.kind == "begin":
                meta = {k: v for k, v in frame.fields.items() if k != "n_tensors"}
        return TensorsResult(tensors, meta)
