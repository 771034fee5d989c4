"""Frame streams: ``[u32 little-endian length][msgpack map]`` repeated, ``begin`` first and
``end`` or ``error`` last.

The writer yields chunks for an HTTP streaming body without copying tensor payloads. The readers
take bytes two ways, and put each frame's bytes into its own aligned buffer exactly once:

* ``feed(chunk)``: chunks of any size; the buffer is allocated once all of the frame's bytes
  have arrived, so a declared length allocates nothing by itself;
* ``writable()`` / ``wrote(n)``: the caller writes into the reader's memory (a socket's
  ``recv_into``), so the buffer is allocated as soon as the length prefix is read, after the
  limit check.
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
    """Splits a byte stream into decoded frames. Bytes arrive either way, or both in turn:

    * ``feed(chunk)`` keeps views of the chunks until their frame is complete: callers must not
      reuse a chunk's memory before that (HTTP clients hand out fresh ``bytes``, which is fine);
    * ``writable()`` is where the next bytes go (a socket's ``recv_into`` writes there) and
      ``wrote(n)`` says how many went there.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._prefix = bytearray(LENGTH_PREFIX.size)
        self._prefix_filled = 0
        self._frame_size: int | None = None  # set once the current frame's prefix is read
        self._received = 0  # bytes of the current frame so far
        self._parts: list[memoryview] = []  # fed chunks' views, while the frame has no buffer
        self._buffer: memoryview | None = None  # the frame's buffer, once writable() made it

    @property
    def inside_frame(self) -> bool:
        """True while a frame (or its length prefix) has started but not finished."""
        return self._prefix_filled > 0 or self._frame_size is not None

    def writable(self) -> memoryview:
        """Where the stream's next bytes go, never empty: the rest of the length prefix, or the
        rest of the current frame's aligned buffer (allocated by the first call inside a frame;
        the length was checked against ``max_frame_bytes`` when the prefix was read)."""
        if self._frame_size is None:
            return memoryview(self._prefix)[self._prefix_filled :]
        if self._buffer is None:
            self._buffer = self._gather()
        return self._buffer[self._received :]

    def wrote(self, n: int) -> list[Frame]:
        """``n`` bytes were written at the start of :meth:`writable`; returns the frame they
        completed (at most one: a writable region never spans two frames)."""
        if self._frame_size is None:
            if not 0 <= n <= LENGTH_PREFIX.size - self._prefix_filled:
                raise ValueError(f"wrote({n}) past the writable part of the length prefix")
            self._prefix_filled += n
            if self._prefix_filled == LENGTH_PREFIX.size:
                self._start_frame(self._prefix)
            return []
        if n and self._buffer is None:
            raise ValueError("wrote() inside a frame before writable() gave its buffer")
        if not 0 <= n <= self._frame_size - self._received:
            raise ValueError(f"wrote({n}) past the end of the current frame")
        self._received += n
        if self._buffer is None or self._received < self._frame_size:
            return []
        return [self._finish(self._buffer)]

    def feed(self, chunk: Buffer) -> list[Frame]:
        view = memoryview(chunk).cast("B")
        frames: list[Frame] = []
        while view.nbytes:
            if self._frame_size is not None and self._buffer is None:
                # No buffer before the frame's bytes are all here: a declared length alone
                # allocates nothing.
                take = min(self._frame_size - self._received, view.nbytes)
                self._parts.append(view[:take])
                self._received += take
                if self._received == self._frame_size:
                    frames.append(self._finish(self._gather()))
            else:  # a length prefix, or a frame whose buffer writable() already made
                target = self.writable()
                take = min(target.nbytes, view.nbytes)
                target[:take] = view[:take]
                frames += self.wrote(take)
            view = view[take:]
        return frames

    def _start_frame(self, prefix: bytearray) -> None:
        (size,) = LENGTH_PREFIX.unpack(prefix)
        self._prefix_filled = 0
        if size == 0:
            raise WireFormatError("frame length 0: a frame is a non-empty msgpack map")
        if size > self.max_frame_bytes:
            raise WireFormatError(
                f"frame length {size} exceeds the limit of {self.max_frame_bytes} bytes"
            )
        self._frame_size = size
        self._received = 0

    def _gather(self) -> memoryview:
        """The current frame's aligned buffer, holding the fed parts received so far."""
        assert self._frame_size is not None
        buffer = aligned_buffer(self._frame_size)
        offset = 0
        for part in self._parts:
            buffer[offset : offset + part.nbytes] = part
            offset += part.nbytes
        self._parts.clear()
        return buffer

    def _finish(self, buffer: memoryview) -> Frame:
        self._frame_size = None
        self._received = 0
        self._buffer = None
        return decode_frame(buffer)

    def close(self) -> None:
        """Raise :class:`TruncatedStreamError` if the bytes stopped inside a frame."""
        if self._frame_size is not None:
            raise TruncatedStreamError(
                f"stream ended inside a frame: {self._received} of {self._frame_size} bytes arrived"
            )
        if self._prefix_filled:
            raise TruncatedStreamError(
                f"stream ended inside a length prefix ({self._prefix_filled} of 4 bytes)"
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
        self._refuse_bytes_after_the_end(memoryview(chunk).nbytes)
        return self._checked(self._frames.feed(chunk))

    def writable(self) -> memoryview:
        """See :meth:`FrameReader.writable`."""
        return self._frames.writable()

    def wrote(self, n: int) -> list[Frame]:
        """See :meth:`FrameReader.wrote`; the frames are checked as ``feed`` checks them."""
        self._refuse_bytes_after_the_end(n)
        return self._checked(self._frames.wrote(n))

    def _refuse_bytes_after_the_end(self, nbytes: int) -> None:
        if self.final is not None and nbytes:
            raise WireFormatError(f"bytes after the stream's {self.final.kind!r} frame")

    def _checked(self, frames: list[Frame]) -> list[Frame]:
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
