"""An HTTP/1.1 response body read from a :class:`Connection`: Content-Length, chunked, or until
the server closes. Iterating gives ``bytes`` (what httpx's ``read``, ``json`` and ``iter_lines``
use); :meth:`ResponseBodyStream.read_into` puts the body straight into the caller's memory.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from ._http1_connection import MAX_LINE_BYTES, Connection, ResponseHead

ITER_CHUNK_BYTES = 64 * 1024
MAX_TRAILER_LINES = 64


class Framing(enum.Enum):
    LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"


def body_framing(method: bytes, head: ResponseHead) -> tuple[Framing, int]:
    """How the response body ends (RFC 9112 §6.3): (framing, Content-Length or 0)."""
    if method == b"HEAD" or head.status_code in (204, 304):
        return Framing.LENGTH, 0
    transfer = _joined(head, b"transfer-encoding")
    if transfer is not None:
        codings = [c.strip().lower() for c in transfer.split(b",")]
        return (Framing.CHUNKED if codings[-1] == b"chunked" else Framing.UNTIL_CLOSE), 0
    length = _joined(head, b"content-length")
    if length is None:
        return Framing.UNTIL_CLOSE, 0
    values = {v.strip() for v in length.split(b",")}  # repeated equal values are allowed
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise httpx.RemoteProtocolError(f"invalid Content-Length {length[:80]!r}")
    return Framing.LENGTH, int(value)


def keeps_alive(head: ResponseHead, framing: Framing) -> bool:
    """Whether the connection may carry another request once this body has been read."""
    tokens = {t.strip().lower() for t in (_joined(head, b"connection") or b"").split(b",")}
    return (
        head.http_version == b"HTTP/1.1"
        and b"close" not in tokens
        and (framing is not Framing.UNTIL_CLOSE)
    )


def _joined(head: ResponseHead, name: bytes) -> bytes | None:
    values = [value for key, value in head.headers if key.lower() == name]
    return b",".join(values) if values else None


class ResponseBodyStream(httpx.SyncByteStream):
    """The body of one response. ``close`` hands the connection back (``release``) when the
    body was read to its end and the server keeps it alive, and closes it otherwise: a client
    that stops reading early disconnects, which tells the server to stop working."""

    def __init__(
        self,
        request: httpx.Request,
        connection: Connection,
        framing: Framing,
        length: int,
        keep_alive: bool,
        release: Callable[[Connection], None],
    ) -> None:
        self._request = request
        self._connection = connection
        self._framing = framing
        self._left = length  # of the body (LENGTH) or of the current chunk (CHUNKED)
        self._in_chunk = False  # CHUNKED: a chunk's data was read, its CRLF not yet
        self._ended = False
        self._closed = False
        self._keep_alive = keep_alive
        self._release = release
        self.bytes_read = 0  # body bytes (chunk framing excluded), as httpx counts them

    def read_into(self, buffer: memoryview) -> int:
        """Read up to ``buffer.nbytes`` (> 0) body bytes into ``buffer``, straight from the
        socket, in one read of the socket (and of a chunk-size line first, when one is due);
        0 once the body has ended."""
        if self._closed:
            raise httpx.StreamClosed()
        if not buffer.nbytes:
            raise ValueError("read_into needs a non-empty buffer (0 means the body ended)")
        with self._for_request(), self._connection.reading():
            allowed = self._allowance(buffer.nbytes)
            if not allowed:
                return 0
            target = buffer if allowed == buffer.nbytes else buffer[:allowed]
            n = self._connection.recv_into(target)
            self._count(n)
            return n

    def __iter__(self) -> Iterator[bytes]:
        if self._closed:
            raise httpx.StreamClosed()
        while True:
            with self._connection.reading():
                allowed = self._allowance(ITER_CHUNK_BYTES)
                data = self._connection.recv(allowed) if allowed else b""
                if allowed:
                    self._count(len(data))
            if not data:
                return
            yield data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keep_alive and self._read_to_the_end():
            self._release(self._connection)
        else:
            self._connection.close()

    def _read_to_the_end(self) -> bool:
        return self._ended or (self._framing is Framing.LENGTH and self._left == 0)

    def _allowance(self, wanted: int) -> int:
        """How many body bytes the next read may take (at most ``wanted``); 0 at the end."""
        if self._ended:
            return 0
        if self._framing is Framing.UNTIL_CLOSE:
            return wanted
        if self._framing is Framing.CHUNKED and self._left == 0:
            self._left = self._next_chunk_size()
        if self._left == 0:
            self._ended = True
            return 0
        return min(wanted, self._left)

    def _count(self, n: int) -> None:
        if n == 0:
            if self._framing is Framing.UNTIL_CLOSE:
                self._ended = True
                return
            self._connection.close()
            raise httpx.RemoteProtocolError(
                "the server closed the connection before the end of the response body "
                f"({self.bytes_read} bytes read)"
            )
        self.bytes_read += n
        if self._framing is not Framing.UNTIL_CLOSE:
            self._left -= n

    def _next_chunk_size(self) -> int:
        """Read up to the next chunk's data: its size (0: the last chunk, trailers read too)."""
        with self._protocol_errors():
            read_line = self._connection.read_line
            if self._in_chunk and read_line(MAX_LINE_BYTES, "a chunk's end") != b"":
                raise httpx.RemoteProtocolError("a chunk's data is not followed by CRLF")
            line = read_line(MAX_LINE_BYTES, "a chunk-size line")
            digits = line.partition(b";")[0].strip()  # chunk extensions are ignored
            if not digits or digits.strip(b"0123456789abcdefABCDEF"):
                raise httpx.RemoteProtocolError(f"invalid chunk-size line {line[:80]!r}")
            size = int(digits, 16)
            self._in_chunk = size > 0
            if size == 0:
                for _ in range(MAX_TRAILER_LINES):
                    if read_line(MAX_LINE_BYTES, "the trailers") == b"":
                        return 0
                raise httpx.RemoteProtocolError(f"more than {MAX_TRAILER_LINES} trailer lines")
            return size

    @contextmanager
    def _for_request(self) -> Iterator[None]:
        """httpx's errors name their request (``iter_raw`` does this for iteration)."""
        try:
            yield
        except httpx.RequestError as exc:
            exc.request = self._request
            raise

    @contextmanager
    def _protocol_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.RemoteProtocolError:
            self._connection.close()  # the framing is lost: nothing after it can be trusted
            raise
