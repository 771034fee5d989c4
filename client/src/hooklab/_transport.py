"""HTTP at the client's edge: msgpack request bodies, frame-stream responses, typed errors."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import httpx
import msgspec
import torch
from tqdm.auto import tqdm

from hooklab_proto import (
    FRAMES_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    ControlFrame,
    Frame,
    StreamReader,
    TensorFrame,
    dtype_code,
)

from ._http1_body import ResponseBodyStream
from ._socket_transport import READ_INTO, SocketTransport
from .errors import ConnectionFailedError, RequestTimeoutError, server_error

if TYPE_CHECKING:
    from typing_extensions import Buffer

# A progress bar appears for downloads expected to take longer than this.
PROGRESS_AFTER_S = 1.0
# "httpx" sends requests through httpx's own transport instead of the socket transport.
HTTP_TRANSPORT_ENV = "HOOKLAB_HTTP_TRANSPORT"


def wire_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a msgpack tensor map inside a request body."""
    flat = tensor.detach().to("cpu").contiguous()
    data: memoryview | bytes = b""
    if flat.numel():
        # An ndarray exports the buffer protocol; numpy's stubs declare it for Python 3.12+ only.
        data = memoryview(cast("Buffer", flat.reshape(-1).view(torch.uint8).numpy()))
    return {
        "kind": "tensor",
        "v": 1,
        "name": "",
        "dtype": dtype_code(flat.dtype),
        "shape": list(flat.shape),
        "pad": b"",
        "data": data,
    }


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return wire_tensor(value)
    raise TypeError(f"cannot send {type(value).__name__} to the server")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode)

# Routes that run on one of the served models: their bodies name it; the GETs take ?model=.
_MODEL_BODIES = frozenset(
    ["/v1/forward", "/v1/run_with_cache", "/v1/run_with_hooks", "/v1/generate",
     "/v1/patching", "/v1/tokenize", "/v1/detokenize"]
)  # fmt: skip
_MODEL_QUERIES = ("/v1/model", "/v1/tokenizer", "/v1/weights/")


class Transport:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        model: str | None = None,
    ):
        self.model = model  # which served model requests go to (None: the server's default)
        api_key = api_key or os.environ.get("HOOKLAB_API_KEY") or None
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = _http_client(
            self.url, headers, httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0))
        )
        self.received_bytes = 0  # frame-stream response bytes read so far (as on the wire)

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise ConnectionFailedError(
                f"cannot reach the hooklab server at {self.url}: {exc}"
            ) from None
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(
                f"the hooklab server at {self.url} did not answer in time ({type(exc).__name__}); "
                "pass a larger timeout= to from_server"
            ) from None
        except httpx.TransportError as exc:
            raise ConnectionFailedError(
                f"the connection to {self.url} failed: {type(exc).__name__}: {exc}"
            ) from None

    @staticmethod
    def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            error = response.json()["error"]
            code, message, hint = error["code"], error["message"], error.get("hint")
        except (ValueError, KeyError, TypeError):
            code, message, hint = (
                "internal",
                f"HTTP {response.status_code}: {response.text[:200]}",
                None,
            )
        error = server_error(
            code, message, hint, response.status_code, response.headers.get("x-request-id")
        )
        retry_after = response.headers.get("retry-after", "")
        if retry_after.isdigit():  # hooklab sends seconds (HTTP also allows a date)
            error.retry_after = float(retry_after)
        raise error

    def _params(self, path: str) -> dict[str, str]:
        named = self.model is not None and path.startswith(_MODEL_QUERIES)
        return {"model": self.model} if named and self.model is not None else {}

    def _content(self, path: str, body: dict[str, Any]) -> bytes:
        if self.model is not None and path in _MODEL_BODIES:
            body = {**body, "model": self.model}
        return _encoder.encode(body)

    def get_json(self, path: str) -> Any:
        with self._errors():
            response = self.client.get(
                path, params=self._params(path), headers={"accept": "application/json"}
            )
        self._raise_for_status(response)
        return response.json()

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        with self._errors():
            response = self.client.post(
                path,
                content=self._content(path, body),
                headers={"content-type": MSGPACK_MEDIA_TYPE, "accept": "application/json"},
            )
        self._raise_for_status(response)
        return response.json()

    def events(self, path: str, body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """POST and yield the server-sent events of the response as (event, decoded JSON data).
        An ``error`` event raises the matching typed error; closing the iterator closes the
        connection, which stops the work on the server."""
        headers = {"content-type": MSGPACK_MEDIA_TYPE, "accept": "text/event-stream"}
        with (
            self._errors(),
            self.client.stream(
                "POST", path, content=self._content(path, body), headers=headers
            ) as response,
        ):
            self._raise_for_status(response)
            event, data = "message", []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    payload = msgspec.json.decode("\n".join(data))
                    if event == "error":
                        error = payload["error"]
                        raise server_error(
                            error["code"], error["message"], error.get("hint"),
                            request_id=error.get("request_id"),
                        )  # fmt: skip
                    yield event, payload
                    event, data = "message", []

    def delete(self, path: str) -> None:
        with self._errors():
            response = self.client.delete(path)
        self._raise_for_status(response)

    def frames(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        progress: bool = True,
        query: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Send a request and decode its frame stream: (the begin and end frames' fields, the
        end's winning, and tensors by name)."""
        content = self._content(path, body) if body is not None else None
        headers = {"accept": FRAMES_MEDIA_TYPE}
        if content is not None:
            headers["content-type"] = MSGPACK_MEDIA_TYPE
        params = {**self._params(path), **(query or {})}
        with (
            self._errors(),
            self.client.stream(
                method, path, content=content, headers=headers, params=params
            ) as response,
        ):
            self._raise_for_status(response)
            try:
                return _read_frames(response, progress)
            finally:
                self.received_bytes += _body_bytes_read(response)


def _http_client(url: str, headers: dict[str, str], timeout: httpx.Timeout) -> httpx.Client:
    """An httpx client on the socket transport (bodies read in place), or on httpx's own
    transport when httpx would send the requests through a proxy or HOOKLAB_HTTP_TRANSPORT
    says ``httpx``."""
    choice = os.environ.get(HTTP_TRANSPORT_ENV, "").strip().lower()
    if choice not in ("", "socket", "httpx"):
        raise ValueError(
            f"{HTTP_TRANSPORT_ENV} is 'socket' (the default) or 'httpx', not {choice!r}"
        )
    if choice == "httpx" or _proxied(url):
        return httpx.Client(base_url=url, headers=headers, timeout=timeout)
    return httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=SocketTransport())


def _proxied(url: str) -> bool:
    """Whether a default httpx client (trusting the environment) sends ``url`` through a proxy.
    httpx mounts a proxy transport per URL pattern from HTTP(S)_PROXY, ALL_PROXY and NO_PROXY:
    asking it keeps its exact rules."""
    if not urllib.request.getproxies():  # where httpx reads them from: none at all
        return False
    with httpx.Client() as probe:
        return probe._transport_for_url(httpx.URL(url)) is not probe._transport


def _read_into_stream(response: httpx.Response) -> ResponseBodyStream | None:
    stream = response.extensions.get(READ_INTO)
    return stream if isinstance(stream, ResponseBodyStream) else None


def _body_bytes_read(response: httpx.Response) -> int:
    stream = _read_into_stream(response)
    return stream.bytes_read if stream is not None else response.num_bytes_downloaded


def _read_frames(
    response: httpx.Response, progress: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    bar = _Progress(int(response.headers.get("content-length", 0)) or None, progress)
    reader = StreamReader()
    try:
        for frame in _decoded_frames(response, reader, bar):
            if isinstance(frame, TensorFrame):
                tensors[frame.name] = frame.tensor
            elif frame.kind == "begin":
                meta = dict(frame.fields)
                # A stream sent while the work runs has no Content-Length: its estimate is here.
                bar.expect(frame.fields.get("expected_bytes"))
            elif frame.kind == "end":  # fields known only once the work ended (a cache's id)
                meta.update(frame.fields)
            elif frame.kind == "error":
                _raise_frame(frame)
    finally:
        bar.close()
    reader.close()
    return meta, tensors


def _decoded_frames(
    response: httpx.Response, reader: StreamReader, bar: _Progress
) -> Iterator[Frame]:
    """The response's frames as their bytes arrive: received straight into each frame's buffer
    when the socket transport carried the response, else fed from httpx's chunks."""
    stream = _read_into_stream(response)
    if stream is not None:
        while n := stream.read_into(reader.writable()):
            bar.advance(n)
            yield from reader.wrote(n)
        return
    for chunk in response.iter_raw():
        bar.advance(len(chunk))
        yield from reader.feed(chunk)


class _Progress:
    """A tqdm bar of bytes and rate, shown once the rate so far says the download will take
    longer than PROGRESS_AFTER_S (a total is needed: Content-Length or the expected bytes)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._total = total
        self._enabled = enabled
        self._started = time.perf_counter()
        self._received = 0
        self._bar: Any = None

    def expect(self, total: int | None) -> None:
        self._total = self._total or total

    def advance(self, n: int) -> None:
        self._received += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not (self._enabled and self._total):
            return
        elapsed = time.perf_counter() - self._started
        if elapsed <= PROGRESS_AFTER_S / 4:
            return
        expected_s = self._total * elapsed / self._received  # at the rate so far
        if expected_s > PROGRESS_AFTER_S:
            self._bar = tqdm(
                total=self._total, initial=self._received, unit="B", unit_scale=True,
                desc="activations",
            )  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _raise_frame(frame: ControlFrame) -> None:
    fields = frame.fields
    raise server_error(
        fields["code"], fields["message"], fields.get("hint"), request_id=fields.get("request_id")
    )
