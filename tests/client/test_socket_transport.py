"""The client's socket transport against a real server on a loopback socket (a scripted raw
HTTP/1.1 server, so that every byte sent back is the test's choice): Content-Length, chunked and
until-close bodies, frame streams decoded in place, keep-alive reuse and its stale connections,
early close, timeouts, error answers, TLS, and when the client picks it."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import torch
from raw_http_server import (
    Exchange,
    ScriptedServer,
    chunked,
    response_head,
    scripted_server,
    with_length,
)

from hooklab._socket_transport import READ_INTO, SocketTransport
from hooklab._transport import HTTP_TRANSPORT_ENV, Transport
from hooklab.errors import ConnectionFailedError, NotFoundError, RequestTimeoutError, ServerError
from hooklab_proto import (
    FRAMES_MEDIA_TYPE,
    EncodedFrame,
    encode_control,
    encode_tensor,
    stream_chunks,
)

TENSORS = {
    "hook_embed": torch.randn(2, 7, 16),
    "blocks.0.attn.hook_pattern": torch.rand(2, 4, 7, 7).to(torch.bfloat16),
    "tokens": torch.arange(14).reshape(2, 7),
    "loss": torch.tensor(3.25),
    "empty": torch.zeros(0, 16),
    "big": torch.randn(256, 1031),  # ~1 MiB: its payload spans many socket reads
}


@pytest.fixture(autouse=True)
def _no_proxy_no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (HTTP_TRANSPORT_ENV, "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def frame_stream(tensors: dict[str, torch.Tensor] = TENSORS) -> tuple[list[EncodedFrame], bytes]:
    encoded = [
        encode_control("begin", request_id="req-7", expected_bytes=123),
        *(encode_tensor(tensor, name) for name, tensor in tensors.items()),
        encode_control("end", cache_id="c_1"),
    ]
    return encoded, b"".join(bytes(chunk) for chunk in stream_chunks(encoded))


def odd_cuts(encoded: list[EncodedFrame], body: bytes, seed: int) -> list[bytes]:
    """The body cut into chunks of odd sizes, with every length prefix split (1+3, 2+2, 3+1
    bytes in turn) and random cuts inside the frames."""
    rng = random.Random(seed)
    cuts = set()
    offset = 0
    for index, frame in enumerate(encoded):
        cuts.add(offset + 1 + index % 3)
        offset += 4 + frame.nbytes
        cuts.add(offset)
    cuts |= {rng.randrange(1, len(body)) for _ in range(40)}
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(body)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(tensors) == list(expected)
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name


def answer_each(respond: dict[str, list[bytes]]) -> object:
    """A handler that answers every request on a connection by its path."""

    def handle(exchange: Exchange) -> None:
        for request in exchange.requests():
            exchange.send(*respond[request.path])

    return handle


@pytest.fixture
def transport_to() -> Iterator[object]:
    opened: list[Transport] = []

    def make(server: ScriptedServer, timeout: float = 10.0) -> Transport:
        transport = Transport(server.url, timeout=timeout)
        opened.append(transport)
        return transport

    yield make
    for transport in opened:
        transport.close()


# --- bodies ------------------------------------------------------------------------------------


def test_content_length_bodies_and_keep_alive_reuse(transport_to) -> None:
    payload = json.dumps({"name": "gpt2", "n_layers": 12}).encode()
    with scripted_server(answer_each({"/v1/model": [with_length(payload)]})) as server:
        transport = transport_to(server)
        for _ in range(3):
            assert transport.get_json("/v1/model") == {"name": "gpt2", "n_layers": 12}
        assert server.connections == 1, "one kept-alive connection carried every request"


def test_a_frame_stream_with_content_length_decodes_to_the_tensors_sent(transport_to) -> None:
    _, body = frame_stream()
    answer = with_length(body, content_type=FRAMES_MEDIA_TYPE)
    with scripted_server(answer_each({"/v1/run_with_cache": [answer]})) as server:
        transport = transport_to(server)
        meta, tensors = transport.frames("POST", "/v1/run_with_cache", {"input": [1, 2]})
        check_tensors(tensors, TENSORS)
        assert meta == {"request_id": "req-7", "expected_bytes": 123, "cache_id": "c_1"}
        assert all(t.numel() == 0 or t.data_ptr() % 64 == 0 for t in tensors.values())
        assert transport.received_bytes == len(body)
        assert msgspec.msgpack.decode(server.requests[0].body) == {"input": [1, 2]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_chunked_frame_stream_with_odd_chunk_sizes(transport_to, seed: int) -> None:
    encoded, body = frame_stream()
    pieces = odd_cuts(encoded, body, seed)
    answer = list(chunked(pieces, content_type=FRAMES_MEDIA_TYPE))
    with scripted_server(answer_each({"/frames": answer})) as server:
        transport = transport_to(server)
        meta, tensors = transport.frames("GET", "/frames")
        check_tensors(tensors, TENSORS)
        assert meta["cache_id"] == "c_1"
        assert transport.received_bytes == len(body), "body bytes, chunk framing excluded"
        # The same body through httpx's own reading (iteration), on the same connection.
        response = transport.client.get("/frames")
        assert response.content == body and response.num_bytes_downloaded == len(body)
        assert server.connections == 1


def test_a_body_that_ends_when_the_server_closes(transport_to) -> None:
    _, body = frame_stream({"x": torch.arange(10.0)})

    def handle(exchange: Exchange) -> None:
        for _ in exchange.requests():
            exchange.send(response_head(200, [("connection", "close")]), body)
            return  # closing the connection ends the body

    with scripted_server(handle) as server:
        transport = transport_to(server)
        _, tensors = transport.frames("GET", "/frames")
        check_tensors(tensors, {"x": torch.arange(10.0)})
        _, tensors = transport.frames("GET", "/frames")
        assert server.connections == 2, "such a connection is not reused"


def test_a_body_cut_short_raises_connection_failed(transport_to) -> None:
    _, body = frame_stream()

    def handle(exchange: Exchange) -> None:
        for _ in exchange.requests():
            exchange.send(*list(chunked([body[: len(body) // 2]]))[:-1])  # no last chunk
            return

    with scripted_server(handle) as server, pytest.raises(ConnectionFailedError, match="closed"):
        transport_to(server).frames("GET", "/frames")


def test_an_error_frame_mid_stream_raises_the_typed_error(transport_to) -> None:
    encoded = [
        encode_control("begin"),
        encode_tensor(torch.ones(3), "a"),
        encode_control("error", code="not_found", message="cache c_9 expired", hint="rerun"),
    ]
    body = b"".join(bytes(chunk) for chunk in stream_chunks(encoded))
    answer = list(chunked([body[:5], body[5:]], content_type=FRAMES_MEDIA_TYPE))
    with scripted_server(answer_each({"/frames": answer})) as server:
        with pytest.raises(NotFoundError, match="cache c_9 expired") as info:
            transport_to(server).frames("GET", "/frames")
        assert info.value.hint == "rerun"


def test_server_sent_events_arrive_as_they_are_split(transport_to) -> None:
    text = (
        b'event: token\ndata: {"token": "Par"}\n\n'
        b'event: token\ndata: {"token": "is"}\n\n'
        b'event: done\ndata: {"n": 2}\n\n'
    )
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    answer = list(chunked(pieces, content_type="text/event-stream"))
    with scripted_server(answer_each({"/v1/generate": answer})) as server:
        events = list(transport_to(server).events("/v1/generate", {"input": "x"}))
    assert events == [("token", {"token": "Par"}), ("token", {"token": "is"}), ("done", {"n": 2})]


def test_request_bodies_arrive_whole() -> None:
    big = bytes(range(256)) * 1024  # over the size sent as its own piece

    def pieces() -> Iterator[bytes]:
        yield b"first,"
        yield big

    with (
        scripted_server(answer_each({"/echo": [with_length(b"{}")]})) as server,
        httpx.Client(base_url=server.url, transport=SocketTransport()) as client,
    ):
        client.post("/echo", content=big)
        client.post("/echo", content=pieces())  # no length: sent chunked
    assert [r.body for r in server.requests] == [big, b"first," + big]
    assert server.requests[1].headers["transfer-encoding"] == "chunked"


def test_an_answer_sent_before_the_body_was_read_wins_over_the_broken_pipe() -> None:
    """A server refusing a large body answers and closes without reading it (413)."""

    def handle(exchange: Exchange) -> None:
        while exchange.reader.readline() not in (b"\r\n", b""):
            pass  # the head only
        error = {"error": {"code": "payload_too_large", "message": "body over 1 MiB"}}
        exchange.send(with_length(json.dumps(error).encode(), 413, connection="close"))

    with (
        scripted_server(handle) as server,
        httpx.Client(base_url=server.url, transport=SocketTransport()) as client,
    ):
        response = client.post("/v1/forward", content=b"x" * (32 << 20))
        assert response.status_code == 413
        assert response.json()["error"]["message"] == "body over 1 MiB"


# --- connections -------------------------------------------------------------------------------


def test_an_idle_connection_the_server_closed_is_replaced(transport_to) -> None:
    def handle(exchange: Exchange) -> None:
        for _ in exchange.requests():
            exchange.send(with_length(b'{"ok": true}'))
            return  # then closes the kept-alive connection, as an idle timeout does

    with scripted_server(handle) as server:
        transport = transport_to(server)
        assert transport.get_json("/a") == {"ok": True}
        time.sleep(0.2)  # the server's FIN arrives
        assert transport.get_json("/b") == {"ok": True}
        assert server.connections == 2


def test_a_stale_connection_failing_before_any_response_byte_is_retried_once(
    transport_to,
) -> None:
    """The server closes a kept-alive connection just as the next request arrives on it (the
    race an idle check cannot see): the request goes again on a fresh connection."""

    def handle(exchange: Exchange) -> None:
        for index, _ in enumerate(exchange.requests()):
            if exchange.number == 0 and index == 1:
                return  # read the second request, close without answering
            exchange.send(with_length(b'{"ok": true}'))

    with scripted_server(handle) as server:
        transport = transport_to(server)
        assert transport.post_json("/a", {"n": 1}) == {"ok": True}
        assert transport.post_json("/b", {"n": 2}) == {"ok": True}
        assert [(r.path, r.connection) for r in server.requests] == [
            ("/a", 0), ("/b", 0), ("/b", 1),
        ]  # fmt: skip
        assert server.requests[1].body == server.requests[2].body, "the body was sent again"


def test_a_fresh_connection_closed_without_an_answer_is_not_retried(transport_to) -> None:
    def handle(exchange: Exchange) -> None:
        for _ in exchange.requests():
            return

    with scripted_server(handle) as server:
        with pytest.raises(ConnectionFailedError, match="without sending a response"):
            transport_to(server).get_json("/a")
        assert server.connections == 1


def test_closing_a_response_early_disconnects_and_the_connection_is_not_reused() -> None:
    disconnected = threading.Event()
    piece = b"x" * 65536

    def handle(exchange: Exchange) -> None:
        for request in exchange.requests():
            if request.path == "/small":
                exchange.send(with_length(b"{}"))
                continue
            exchange.send(response_head(200, [("transfer-encoding", "chunked")]))
            try:
                for _ in range(10_000):  # 640 MiB: far more than the client reads
                    exchange.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                disconnected.set()  # where a server stops the work
            return

    with (
        scripted_server(handle) as server,
        httpx.Client(base_url=server.url, transport=SocketTransport()) as client,
    ):
        client.get("/small")
        with client.stream("GET", "/big") as response:
            stream = response.extensions[READ_INTO]
            buffer = memoryview(bytearray(100_000))
            assert stream.read_into(buffer) > 0
        assert disconnected.wait(10), "the server saw the client go"
        client.get("/small")
        assert [r.connection for r in server.requests] == [0, 0, 1]


def test_a_server_that_does_not_answer_in_time(transport_to) -> None:
    release = threading.Event()

    def handle(exchange: Exchange) -> None:
        for request in exchange.requests():
            if request.path == "/stalls-mid-body":
                exchange.send(response_head(200, [("content-length", "1000")]), b"\x05\x00")
            release.wait(10)
            return

    with scripted_server(handle) as server:
        transport = transport_to(server, timeout=0.3)
        try:
            started = time.perf_counter()
            with pytest.raises(RequestTimeoutError, match="ReadTimeout"):
                transport.get_json("/stalls")
            with pytest.raises(RequestTimeoutError, match="ReadTimeout"):
                transport.frames("GET", "/stalls-mid-body")
            assert time.perf_counter() - started < 5
        finally:
            release.set()


def test_a_4xx_json_error_raises_the_typed_error(transport_to) -> None:
    error = {"error": {"code": "not_found", "message": "no tensor t_1", "hint": "list them"}}
    answer = with_length(json.dumps(error).encode(), 404, **{"x-request-id": "req-404"})
    with scripted_server(answer_each({"/v1/tensors/t_1": [answer]})) as server:
        transport = transport_to(server)
        with pytest.raises(NotFoundError) as info:
            transport.frames("GET", "/v1/tensors/t_1")
        assert (info.value.status, info.value.request_id) == (404, "req-404")
        with pytest.raises(ServerError, match="no tensor t_1"):
            transport.get_json("/v1/tensors/t_1")
        assert server.connections == 1, "an error answer read to its end keeps the connection"


def test_nothing_listening_raises_connection_failed() -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        transport = Transport(f"http://127.0.0.1:{bound.getsockname()[1]}")
        with pytest.raises(ConnectionFailedError, match="cannot reach"):
            transport.get_json("/v1/model")
        transport.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_through_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    encoded, body = frame_stream()
    answer = list(chunked(odd_cuts(encoded, body, 3), content_type=FRAMES_MEDIA_TYPE))
    with scripted_server(answer_each({"/frames": answer}), tls=server_tls) as server:
        client_tls = ssl.create_default_context(cafile=str(cert))
        transport = Transport(server.url)
        transport.client = httpx.Client(
            base_url=server.url, transport=SocketTransport(ssl_context=client_tls)
        )
        try:
            for _ in range(2):
                _, tensors = transport.frames("GET", "/frames")
                check_tensors(tensors, TENSORS)
        finally:
            transport.close()
        assert server.connections == 1
        untrusting = Transport(server.url)  # the default roots do not know the certificate
        with pytest.raises(ConnectionFailedError, match="certificate"):
            untrusting.get_json("/frames")
        untrusting.close()


# --- which transport ---------------------------------------------------------------------------


def uses_socket_transport(url: str) -> bool:
    transport = Transport(url)
    try:
        with transport.client.stream("GET", "/x") as response:
            response.read()
            return READ_INTO in response.extensions
    finally:
        transport.close()


def test_the_socket_transport_is_the_default_and_httpx_the_escape_hatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with scripted_server(answer_each({"/x": [with_length(b"{}")]})) as server:
        assert uses_socket_transport(server.url)
        monkeypatch.setenv(HTTP_TRANSPORT_ENV, "httpx")
        assert not uses_socket_transport(server.url)
        monkeypatch.setenv(HTTP_TRANSPORT_ENV, "sockets")
        with pytest.raises(ValueError, match="'socket' \\(the default\\) or 'httpx'"):
            Transport(server.url)


def test_a_url_httpx_would_proxy_keeps_httpx_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = Transport("http://gpu-box:8000")
    chosen = proxied.client._transport_for_url(httpx.URL("http://gpu-box:8000"))
    proxied.close()
    assert isinstance(chosen, httpx.HTTPTransport) and not isinstance(chosen, SocketTransport)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with scripted_server(answer_each({"/x": [with_length(b"{}")]})) as server:
        assert uses_socket_transport(server.url), "NO_PROXY exempts it"
