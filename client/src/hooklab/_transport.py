"""HTTP at the client's edge: msgpack request bodies, frame-stream responses, typed errors."""

from __future__ import annotations

import os
import time
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
    StreamReader,
    TensorFrame,
    dtype_code,
)

from .errors import ConnectionFailedError, RequestTimeoutError, server_error

if TYPE_CHECKING:
    from typing_extensions import Buffer

# A progress bar appears for downloads expected to take longer than this.
PROGRESS_AFTER_S = 1.0


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
        self.client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0)),
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
                self.received_bytes += response.num_bytes_downloaded


def _read_frames(
    response: httpx.Response, progress: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    reader = StreamReader()
    meta: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    total = int(response.headers.get("content-length", 0)) or None
    bar = None
    started = time.perf_counter()
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if (
            progress
            and bar is None
            and total
            and time.perf_counter() - started > PROGRESS_AFTER_S / 4
        ):
            rate = received / max(time.perf_counter() - started, 1e-9)
            if total / rate > PROGRESS_AFTER_S:
                bar = tqdm(
                    total=total, initial=received, unit="B", unit_scale=True, desc="activations"
                )
        elif bar is not None:
            bar.update(len(chunk))
        for frame in reader.feed(chunk):
            if isinstance(frame, TensorFrame):
                tensors[frame.name] = frame.tensor
            elif frame.kind == "begin":
                meta = dict(frame.fields)
                # A stream sent while the work runs has no Content-Length: its estimate is here.
                total = total or frame.fields.get("expected_bytes")
            elif frame.kind == "end":  # fields known only once the work ended (a cache's id)
                meta.update(frame.fields)
            elif frame.kind == "error":
                _raise_frame(frame)
    if bar is not None:
        bar.close()
    reader.close()
    return meta, tensors


def _raise_frame(frame: ControlFrame) -> None:
    fields = frame.fields
    raise server_error(
        fields["code"], fields["message"], fields.get("hint"), request_id=fields.get("request_id")
    )
