"""A scripted HTTP/1.1 server on a loopback socket, written with nothing but ``socket``: each test
decides byte by byte what goes back (odd chunk sizes, missing answers, closed connections,
stalls), which a real framework would not let it do."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: int  # which accepted connection (0, 1, ...) carried it


Handler = Callable[["Exchange"], None]


@dataclass
class Exchange:
    """One accepted connection, as a handler sees it."""

    server: ScriptedServer
    sock: socket.socket
    reader: BinaryIO
    number: int

    def requests(self) -> Iterator[RawRequest]:
        """The requests on this connection, each recorded on the server, until the client
        closes it."""
        while (request := read_request(self.reader, self.number)) is not None:
            self.server.requests.append(request)
            yield request

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.sock.sendall(piece)


@dataclass
class ScriptedServer:
    handler: Handler
    tls: ssl.SSLContext | None = None
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            number = self.connections
            self.connections += 1
            self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            with sock, sock.makefile("rb") as reader:
                self.handler(Exchange(self, sock, reader, number))
        except OSError:
            pass  # the client went away (reset, broken pipe): what some tests are about
        except BaseException as exc:  # surfaced by the test through server.errors
            self.errors.append(exc)

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def scripted_server(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> Iterator[ScriptedServer]:
    server = ScriptedServer(handler, tls)
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors


def read_request(reader: BinaryIO, connection: int) -> RawRequest | None:
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int(reader.readline().split(b";")[0], 16):
            body += reader.read(size)
            reader.readline()
        reader.readline()  # the empty line after the last chunk (no trailers sent)
        return RawRequest(method, path, headers, bytes(body), connection)
    body = reader.read(int(headers.get("content-length", 0)))
    return RawRequest(method, path, headers, body, connection)


def response_head(
    status: int = 200, headers: Iterable[tuple[str, str]] = (), reason: str = "OK"
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def with_length(
    body: bytes, status: int = 200, content_type: str = "application/json", **headers: str
) -> bytes:
    fields = [("content-type", content_type), ("content-length", str(len(body)))]
    return response_head(status, [*fields, *headers.items()]) + body


def chunked(
    pieces: Iterable[bytes], content_type: str = "application/json", **headers: str
) -> Iterator[bytes]:
    """A chunked response, one chunk per piece (empty pieces skipped: one would end the body)."""
    fields = [("content-type", content_type), ("transfer-encoding", "chunked")]
    yield response_head(200, [*fields, *headers.items()])
    for piece in pieces:
        if piece:
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"
