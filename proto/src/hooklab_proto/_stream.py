"""Frame streams: ``[u32 little-endian length][msgpack map]`` repeated, ``begin`` first and
``end`` or ``error`` last.

The writer yields chunks for an HTTP streaming body without copying tensor payloads; the readers
accept chunks of any size and copy each frame's bytes exactly once, into a buffer allocated only
after all of the frame's bytes have arrived.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from ._buffers import Buffer, aligned_buffer
from ._frames import ControlFrame, Frame, decode_frame
from ._tensor import EncodedFrame
from .errors import TruncatedStreamError, WireFormatError

LENGTH_PREFIX = struct.Struct("<I")
DEFAULT_MAX_FRAME_BYTES = 2**32 - 1
# Frames smaller than this are gathered into one chunk; larger payloads go out as views.
COALESCE_BYTES = 1 << 20


def stream_length(frames: Iterable[EncodedFrame]) -> int:
    """Total bytes :func:`stream_chunks` yields for ``frames`` (for ``Content-Length``)."""
    return sum(LENGTH_PREFIX.size + frame.nbytes for frame in frames)


def stream_chunks(
    frames: Iterable[EncodedFrame], coalesce_bytes: int = COALESCE_BYTES
) -> Iterator[bytes | memoryview]:
    """Yield the stream's bytes: small pieces gathered into chunks, large payloads as views."""
    pending = bytearray()
    for frame in frames:
        pending += LENGTH_PREFIX.pack(frame.nbytes)
        pending += frame.header
        if frame.payload.nbytes < coalesce_bytes:
            pending += frame.payload
        else:
            yield bytes(pending)
            pending.clear()
            yield frame.payload
        if len(pending) >= coalesce_bytes:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


class FrameReader:
    """Splits a byte stream fed in arbitrary chunks into decoded frames.

    ``feed`` keeps views of the chunks it is given until their frame is complete: callers must not
    reuse a chunk's memory afterwards (HTTP clients hand out fresh ``bytes``, which is fine).
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._prefix = bytearray()
        self._frame_size: int | None = None
        self._parts: list[memoryview] = []
        self._received = 0

    @property
    def inside_frame(self) -> bool:
        """True while a frame (or its length prefix) has started but not finished."""
        return bool(self._prefix) or self._frame_size is not None

    def feed(self, chunk: Buffer) -> list[Frame]:
        view = memoryview(chunk).cast("B")
        frames: list[Frame] = []
        while view.nbytes:
            if self._frame_size is None:
                view = self._read_prefix(view)
                continue
            take = min(self._frame_size - self._received, view.nbytes)
            self._parts.append(view[:take])
            self._received += take
            view = view[take:]
            if self._received == self._frame_size:
                frames.append(decode_frame(self._assemble()))
        return frames

    def _read_prefix(self, view: memoryview) -> memoryview:
        take = min(LENGTH_PREFIX.size - len(self._prefix), view.nbytes)
        self._prefix += view[:take]
        if len(self._prefix) == LENGTH_PREFIX.size:
            (size,) = LENGTH_PREFIX.unpack(self._prefix)
            self._prefix.clear()
            if size == 0:
                raise WireFormatError("frame length 0: a frame is a non-empty msgpack map")
            if size > self.max_frame_bytes:
                raise WireFormatError(
                    f"frame length {size} exceeds the limit of {self.max_frame_bytes} bytes"
                )
            self._frame_size = size
        return view[take:]

    def _assemble(self) -> memoryview:
        assert self._frame_size is not None
        buffer = aligned_buffer(self._frame_size)
        offset = 0
        for part in self._parts:
            buffer[offset : offset + part.nbytes] = part
            offset += part.nbytes
        self._parts.clear()
        self._frame_size = None
        self._received = 0
        return buffer

    def close(self) -> None:
        """Raise :class:`TruncatedStreamError` if the bytes stopped inside a frame."""
        if self._frame_size is not None:
            raise TruncatedStreamError(
                f"stream ended inside a frame: {self._received} of {self._frame_size} bytes arrived"
            )
        if self._prefix:
            raise TruncatedStreamError(
                f"stream ended inside a length prefix ({len(self._prefix)} of 4 bytes)"
            )


class StreamReader:
    """A :class:`FrameReader` that also checks the stream's shape: ``begin`` first, then tensors,
    then exactly one ``end`` or ``error`` frame and nothing after it."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._frames = FrameReader(max_frame_bytes)
        self._started = False
        self.final: ControlFrame | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None

    def feed(self, chunk: Buffer) -> list[Frame]:
        if self.final is not None and memoryview(chunk).nbytes:  # finished
            raise WireFormatError(f"bytes after the stream's {self.final.kind!r} frame")
        frames = self._frames.feed(chunk)
        for frame in frames:
            self._check_order(frame)
        return frames

    def _check_order(self, frame: Frame) -> None:
        if self.finished:
            raise WireFormatError(f"frame {frame.kind!r} after the stream's final frame")
        if not self._started:
            if frame.kind != "begin":
                raise WireFormatError(f"a stream starts with a 'begin' frame, not {frame.kind!r}")
            self._started = True
        elif frame.kind == "begin":
            raise WireFormatError("a second 'begin' frame inside one stream")
        elif isinstance(frame, ControlFrame):  # "end" or "error"
            self.final = frame

    def close(self) -> None:
        """Raise :class:`TruncatedStreamError` unless the stream ended with ``end`` or ``error``."""
        if self.final is not None and self._frames.inside_frame:  # finished
            raise WireFormatError(f"bytes after the stream's {self.final.kind!r} frame")
        self._frames.close()
        if not self.finished:
            raise TruncatedStreamError(
                "stream stopped before its 'end' or 'error' frame; the response was truncated"
            )


def read_stream(
    chunks: Iterable[Buffer], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Iterator[Frame]:
    """Decode a whole stream from an iterable of chunks, checking that it was not truncated."""
    reader = StreamReader(max_frame_bytes)
    for chunk in chunks:
        yield from reader.feed(chunk)
    reader.close()
