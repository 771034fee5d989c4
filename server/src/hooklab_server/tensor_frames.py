"""A result's named tensors as a proto frame stream, and back: what the API sends clients, and
what a worker sends the API through Redis (which the API passes on without decoding when the
client wants frames)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
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

from .ops import CaptureStream, RequestError, TensorsResult, failure_error

SMALL_BYTES = 64 * 1024  # chunks below this are gathered (headers, small tensors)
# Fields of the begin and end frames about the stream itself, not the result.
_STREAM_FIELDS = frozenset({"n_frames", "expected_bytes", "stats"})


def encode_frames(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[EncodedFrame]:
    """begin, one frame per tensor (payloads are views, no copy on the CPU), end."""
    started = time.perf_counter()
    frames = [
        encode_control("begin", n_frames=len(tensors), **meta),
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
        yield from pieces_of(chunk, piece_bytes)
    if pending:
        yield bytes(pending)


def pieces_of(chunk: bytes | memoryview, piece_bytes: int) -> Iterator[memoryview]:
    """``chunk`` cut into views of at most ``piece_bytes``."""
    view = memoryview(chunk).cast("B")
    for start in range(0, len(view), piece_bytes):
        yield view[start : start + piece_bytes]


async def _encoded(tensor: torch.Tensor, name: str) -> EncodedFrame:
    if tensor.device.type == "cpu":
        return encode_tensor(tensor, name)  # a view: no copy
    return await asyncio.to_thread(encode_tensor, tensor, name)  # copied to host memory


async def capture_frames(
    stream: CaptureStream, error_fields: Callable[[RequestError], dict[str, Any]]
) -> AsyncGenerator[bytes | memoryview, None]:
    """The frame stream of a run whose captures arrive while it runs: begin (with the bytes
    expected, for a progress bar), each capture as it comes, then the rest of the result and an
    end frame carrying the fields known only then — or an error frame with ``error_fields`` of
    the failure's error (none when the client left: the stream just stops). The end
    frame's stats say when the first tensor went out and when the forward ended (wall clock)."""
    try:
        yield from_frames([encode_control("begin", expected_bytes=stream.expected_bytes)])
        first_tensor_at: float | None = None
        tensor_bytes = 0
        async for name, tensor in stream.captures():
            frame = await _encoded(tensor, name)
            tensor_bytes += frame.payload.nbytes
            for chunk in stream_chunks([frame]):
                yield chunk
            first_tensor_at = first_tensor_at or time.time()
        outcome = stream.outcome
        if isinstance(outcome, BaseException):
            error = failure_error(outcome, stream.token)
            if error is not None:
                yield from_frames([encode_control("error", **error_fields(error))])
            return
        assert outcome is not None
        rest = [await _encoded(tensor, name) for name, tensor in outcome.tensors.items()]
        tensor_bytes += sum(frame.payload.nbytes for frame in rest)
        stats = {
            "tensor_bytes": tensor_bytes,
            "first_tensor_at": first_tensor_at,
            "forward_end_at": stream.forward_end_at,
        }
        for chunk in stream_chunks([*rest, encode_control("end", **outcome.meta, stats=stats)]):
            yield chunk
    finally:
        stream.close()


def from_frames(frames: list[EncodedFrame]) -> bytes:
    """Small frames as one chunk."""
    return b"".join(bytes(chunk) for chunk in stream_chunks(frames))


@dataclass
class StreamedTensors:
    """A result whose frame stream is still arriving from a worker: ``nbytes`` long, or of a
    length not known yet (None: the worker sends captures while the work runs)."""

    nbytes: int | None
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
                meta = {k: v for k, v in frame.fields.items() if k not in _STREAM_FIELDS}
            elif isinstance(frame, ControlFrame) and frame.kind == "end":
                meta.update((k, v) for k, v in frame.fields.items() if k not in _STREAM_FIELDS)
        return TensorsResult(tensors, meta)
