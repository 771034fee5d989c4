"""An httpx transport that speaks HTTP/1.1 over plain sockets (TLS for ``https``), so that a
response body can be read straight from the socket into the caller's memory.

``client.stream(...)`` responses carry their body stream in ``response.extensions[READ_INTO]``:
its ``read_into(buffer)`` receives into ``buffer`` with no intermediate ``bytes`` (the frame
decoder gives it each frame's own aligned buffer). Everything else about httpx stays as it is:
iteration, ``read()``, ``json()``, ``iter_lines()``, timeouts and exception types.

Idle connections are kept per origin for a few seconds and reused; one the server closed while
it sat idle, found out only when reused (the request fails before any response byte), is
retried once on a fresh connection.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from ._http1_body import ResponseBodyStream, body_framing, keeps_alive
from ._http1_connection import Connection, ResponseHead

READ_INTO = "hooklab.read_into"  # response extension: the ResponseBodyStream of the body
# Under the server's keep-alive (5 s by default), so an idle connection is rarely found closed.
KEEPALIVE_EXPIRY_S = 4.0
MAX_IDLE_PER_ORIGIN = 8
# Request pieces smaller than this are gathered into one send (the head and a msgpack body).
COALESCE_BYTES = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}

# How a reused connection the server has closed fails (EOF, reset, broken pipe).
_STALE_CONNECTION_ERRORS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)

Origin = tuple[str, str, int]  # scheme, host, port
Timeouts = dict[str, Any]  # httpx's request.extensions["timeout"]: connect/read/write/pool


class SocketTransport(httpx.BaseTransport):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context  # made on the first https request when None
        self._idle: dict[Origin, list[Connection]] = {}
        self._lock = threading.Lock()  # one httpx.Client may be shared between threads
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        origin = _origin(request.url)
        timeouts: Timeouts = request.extensions.get("timeout", {})
        # A body given as bytes can be sent again; a generator's cannot.
        replayable = isinstance(request.stream, httpx.ByteStream)
        connection = self._idle_connection(origin)
        while True:
            if connection is None:
                connection = self._connect(origin, request, timeouts)
            try:
                return self._exchange(origin, connection, request, timeouts)
            except BaseException as exc:
                connection.close()
                stale = (
                    isinstance(exc, _STALE_CONNECTION_ERRORS)
                    and connection.reused
                    and connection.response_bytes == 0
                )
                if not (stale and replayable):
                    raise
                connection = None  # once: a fresh connection is not reused

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [connection for connections in self._idle.values() for connection in connections]
            self._idle.clear()
        for connection in idle:
            connection.close()

    # --- one request ---------------------------------------------------------------------------

    def _exchange(
        self, origin: Origin, connection: Connection, request: httpx.Request, timeouts: Timeouts
    ) -> httpx.Response:
        connection.response_bytes = 0
        answered_early = False
        connection.set_timeout(timeouts.get("write"))
        try:
            with connection.writing():
                connection.send(_request_pieces(request))
        except httpx.WriteError as write_error:
            # A server may answer (413: body too large) and close before reading the whole body;
            # its answer says more than the broken pipe.
            head = self._read_head(connection, timeouts, fallback=write_error)
            answered_early = True
        else:
            head = self._read_head(connection, timeouts)
        framing, length = body_framing(request.method.encode("ascii"), head)
        stream = ResponseBodyStream(
            request,
            connection,
            framing,
            length,
            keep_alive=keeps_alive(head, framing) and not answered_early,
            release=functools.partial(self._release, origin),
        )
        extensions = {
            "http_version": head.http_version,
            "reason_phrase": head.reason_phrase,
            READ_INTO: stream,
        }
        return httpx.Response(
            head.status_code, headers=head.headers, stream=stream, extensions=extensions
        )

    @staticmethod
    def _read_head(
        connection: Connection, timeouts: Timeouts, fallback: httpx.WriteError | None = None
    ) -> ResponseHead:
        try:
            connection.set_timeout(timeouts.get("read"))
            with connection.reading():
                return connection.read_head()
        except httpx.TransportError:
            if fallback is not None:
                raise fallback from None
            raise

    # --- connections ---------------------------------------------------------------------------

    def _connect(self, origin: Origin, request: httpx.Request, timeouts: Timeouts) -> Connection:
        scheme, host, port = origin
        timeout = timeouts.get("connect")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port}: {exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connecting to {host}:{port}: {exc}") from exc
        try:
            # Requests are sent whole; waiting to coalesce small writes only adds latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                server_name = request.extensions.get("sni_hostname", host)
                sock = self._tls_context().wrap_socket(sock, server_hostname=server_name)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(f"TLS handshake with {host}:{port}: {exc}") from exc
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise httpx.ConnectError(f"TLS handshake with {host}:{port}: {exc}") from exc
        return Connection(sock)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # httpx's own default: certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR.
            self._ssl_context = httpx.create_ssl_context(verify=True, trust_env=True)
        return self._ssl_context

    def _idle_connection(self, origin: Origin) -> Connection | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin, [])
            while idle:
                connection = idle.pop()  # the most recently used is the likeliest alive
                if now - connection.idle_since < KEEPALIVE_EXPIRY_S and connection.reusable():
                    return connection
                connection.close()
        return None

    def _release(self, origin: Origin, connection: Connection) -> None:
        """Keep a connection whose response was read to its end, for the next request."""
        connection.reused = True
        connection.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < MAX_IDLE_PER_ORIGIN and connection.reusable():
                idle.append(connection)
                return
        connection.close()


def _origin(url: httpx.URL) -> Origin:
    if url.scheme not in DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"the socket transport speaks http and https, not {url}")
    return url.scheme, url.host, url.port or DEFAULT_PORTS[url.scheme]


def _request_pieces(request: httpx.Request) -> Iterator[bytes | bytearray]:
    """The request as written on the wire: small pieces gathered, large body pieces as they are."""
    pending = bytearray(
        b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)
    )
    for name, value in request.headers.raw:
        if any(c in name or c in value for c in (b"\r", b"\n", b"\0")):
            raise httpx.LocalProtocolError(f"a line break or NUL in header {name!r}")
        pending += b"%s: %s\r\n" % (name, value)
    pending += b"\r\n"
    if not isinstance(request.stream, httpx.SyncByteStream):
        raise RuntimeError("the socket transport sends requests of a sync httpx.Client")
    chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
    for piece in request.stream:
        if not piece:
            continue
        if chunked:
            pending += b"%x\r\n" % len(piece)
        if len(piece) < COALESCE_BYTES:
            pending += piece
        else:
            yield pending
            pending = bytearray()
            yield piece
        if chunked:
            pending += b"\r\n"
    if chunked:
        pending += b"0\r\n\r\n"
    yield pending
