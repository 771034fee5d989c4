"""One HTTP/1.1 connection: a socket, a small side buffer for protocol lines, and reads that put
body bytes straight into the caller's memory.

Socket errors surface as httpx's exceptions (``ReadTimeout``, ``ReadError``, ...), so code above
the client's transport handles them as it handles httpx's own.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

# A read smaller than this (a frame's length prefix, a small frame) goes through the side
# buffer: one recv serves many small pieces, and large reads still go straight to the caller.
DIRECT_READ_MIN_BYTES = 8 * 1024
SIDE_READ_BYTES = 16 * 1024
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one response
MAX_LINE_BYTES = 8 * 1024  # a chunk-size line or a trailer line


@dataclass(frozen=True, slots=True)
class ResponseHead:
    http_version: bytes  # b"HTTP/1.1"
    status_code: int
    reason_phrase: bytes
    headers: list[tuple[bytes, bytes]]


class Connection:
    """A connected socket (plain or TLS) that carries one request and its response at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._side = bytearray()  # bytes received but not yet handed out
        self._side_start = 0
        self.closed = False
        self.idle_since = time.monotonic()
        self.reused = False  # served an earlier request
        self.response_bytes = 0  # of the current response, head included (0: nothing yet)

    # --- timeouts and errors -------------------------------------------------------------------

    def set_timeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Socket failures while reading, as httpx's exceptions; the connection is dropped."""
        try:
            yield
        except TimeoutError as exc:
            self.close()
            raise httpx.ReadTimeout(f"no response bytes in time: {exc}") from exc
        except OSError as exc:
            self.close()
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Socket failures while sending, as httpx's exceptions; the connection stays open, as
        the server may have answered before it stopped reading."""
        try:
            yield
        except TimeoutError as exc:
            raise httpx.WriteTimeout(f"the request could not be sent in time: {exc}") from exc
        except OSError as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc

    # --- sending -------------------------------------------------------------------------------

    def send(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        """Send the pieces in order (socket errors as they come: the caller maps them)."""
        for piece in pieces:
            self._sock.sendall(piece)

    # --- receiving -----------------------------------------------------------------------------

    @property
    def _buffered(self) -> int:
        return len(self._side) - self._side_start

    def _compact(self) -> None:
        """Drop the bytes already handed out, so that the side buffer stays small."""
        if self._side_start:
            del self._side[: self._side_start]
            self._side_start = 0

    def _fill(self) -> int:
        """Append what the socket has (up to SIDE_READ_BYTES) to the side buffer; 0 at EOF."""
        data = self._sock.recv(SIDE_READ_BYTES)
        self._side += data
        self.response_bytes += len(data)
        return len(data)

    def _take_buffered_into(self, view: memoryview) -> int:
        n = min(view.nbytes, self._buffered)
        with memoryview(self._side) as side:
            view[:n] = side[self._side_start : self._side_start + n]
        self._side_start += n
        return n

    def recv_into(self, view: memoryview) -> int:
        """Read up to ``view.nbytes`` (> 0) bytes into ``view``; 0 at EOF. Bytes already in the
        side buffer come first; otherwise a large read goes straight from the socket."""
        if self._buffered:
            return self._take_buffered_into(view)
        if view.nbytes < DIRECT_READ_MIN_BYTES:
            self._compact()
            return self._take_buffered_into(view) if self._fill() else 0
        n = self._sock.recv_into(view)
        self.response_bytes += n
        return n

    def recv(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) bytes as a fresh ``bytes``; ``b""`` at EOF."""
        if self._buffered:
            start = self._side_start
            self._side_start = min(start + limit, len(self._side))
            with memoryview(self._side) as side:
                return bytes(side[start : self._side_start])
        data = self._sock.recv(limit)
        self.response_bytes += len(data)
        return data

    def read_line(self, max_bytes: int, what: str) -> bytes:
        """One CRLF- (or LF-) terminated line without its terminator."""
        self._compact()
        searched = 0
        while True:
            end = self._side.find(b"\n", searched)
            if end >= 0:
                line = bytes(self._side[self._side_start : end])
                self._side_start = end + 1
                return line.removesuffix(b"\r")
            if self._buffered > max_bytes:
                raise httpx.RemoteProtocolError(f"{what} longer than {max_bytes} bytes")
            searched = len(self._side)
            if not self._fill():
                raise httpx.RemoteProtocolError(
                    f"the server closed the connection inside {what}"
                    if self._buffered or self.response_bytes
                    else "the server closed the connection without sending a response"
                )

    def read_head(self) -> ResponseHead:
        """The status line and headers of the next final response (1xx ones are skipped)."""
        while True:
            head = self._read_one_head()
            if not 100 <= head.status_code < 200:
                return head

    def _read_one_head(self) -> ResponseHead:
        status_line = self.read_line(MAX_HEAD_BYTES, "the status line")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers: list[tuple[bytes, bytes]] = []
        size = len(status_line)
        while line := self.read_line(MAX_HEAD_BYTES, "the response headers"):
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(f"response headers over {MAX_HEAD_BYTES} bytes")
            headers.append(_header(line))
        return ResponseHead(version, int(code), reason.strip(), headers)

    # --- lifetime ------------------------------------------------------------------------------

    def reusable(self) -> bool:
        """Open, nothing left unread, and the server has not closed it or sent anything since
        (a readable idle connection is at EOF or holds bytes nobody asked for)."""
        if self.closed or self._buffered:
            return False
        try:
            return not _readable(self._sock)
        except (OSError, ValueError):  # closed under us
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()


def _readable(sock: socket.socket) -> bool:
    if hasattr(select, "poll"):  # no limit on descriptor numbers, unlike select()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
        # Whitespace before the colon, or an obsolete folded line, can smuggle headers (RFC 9112).
        raise httpx.RemoteProtocolError(f"malformed response header line {line[:80]!r}")
    return name, value.strip(b" \t")
