"""What the accounts tests need on top of tests/hostile/server_process.py (used as it is).

* ``keys_cli`` / ``add_key``: the real ``hooklab-server keys …`` CLI (issue 9's contract,
  /work/notes/contract9.md): ``keys add NAME [--admin] [--quota QUOTA=VALUE]`` prints the new
  key, alone, on stdout. The keys file is passed as the ``HOOKLAB_KEYS_FILE`` setting (one
  test, ``test_auth.test_keys_cli_takes_keys_file_after_its_arguments``, uses the flag form).
* ``Traffic`` and ``RecordingTransport``: every response the tests receive — its headers and its
  body as read, streams included — is kept, so that a test can grep all of it for a key. The
  real client is recorded too: ``Accounts.connect`` swaps the client's ``httpx.Client`` for a
  recording one with the very headers the client set (its ``Authorization`` included).
* ``Accounts``: the started server, its keys by name, and clients for a key name.
* Checks of the error envelope (``assert_error``), ``Retry-After`` (``retry_after``), the access
  log (``access_lines``) and JSON tensors.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from hostile.server_process import Metrics, ServerProcess, server_executable

KEY_PREFIX = "hl_"
KEY_PATTERN = re.compile(r"^hl_[A-Za-z0-9_\-]+$")
CLI_TIMEOUT_S = 60.0
JSON_MEDIA = "application/json"
QUOTAS = (
    "concurrent_requests",
    "tokens_per_minute",
    "stored_bytes",
    "max_new_tokens",
    "max_patching_forwards",
)


# ---- the keys CLI ------------------------------------------------------------------------------


def keys_cli(
    keys_file: Path, verb: str, *args: str, flag: bool = False
) -> subprocess.CompletedProcess[str]:
    """``hooklab-server keys VERB [args]`` on ``keys_file``, given as the ``HOOKLAB_KEYS_FILE``
    setting (the contract: every setting is also an environment variable) or, with ``flag``, as
    ``--keys-file PATH`` after the arguments, as contract9 writes the command."""
    cmd = [str(server_executable()), "keys", verb, *args]
    env = {**os.environ, "HOOKLAB_KEYS_FILE": str(keys_file)}
    env.pop("HOOKLAB_API_KEY", None)
    if flag:
        del env["HOOKLAB_KEYS_FILE"]
        cmd += ["--keys-file", str(keys_file)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False
    )


def add_key(
    keys_file: Path, name: str, *, admin: bool = False, quota: Mapping[str, int] | None = None
) -> str:
    """A new key made by ``hooklab-server keys add``; at most one ``--quota`` per key, so that
    the test does not depend on whether ``--quota`` repeats or takes several values."""
    args = [name]
    if admin:
        args.append("--admin")
    assert quota is None or len(quota) <= 1, "one --quota per key (see the docstring)"
    for quota_name, value in (quota or {}).items():
        args += ["--quota", f"{quota_name}={value}"]
    done = keys_cli(keys_file, "add", *args)
    assert done.returncode == 0, (
        f"hooklab-server keys add {' '.join(args)} failed ({done.returncode}):\n"
        f"{done.stdout}\n{done.stderr}"
    )
    key = done.stdout.strip()
    assert KEY_PATTERN.match(key), (
        f"'keys add {name}' must print the new key (hl_ + url-safe text) alone on stdout; "
        f"stdout was {done.stdout!r}"
    )
    return key


# ---- recording every response ------------------------------------------------------------------


class Traffic:
    """Everything the tests received or read: (label, bytes), appended as it arrives."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytearray]] = []
        self._lock = threading.Lock()

    def add(self, label: str, data: bytes | str = b"") -> bytearray:
        buffer = bytearray(data.encode() if isinstance(data, str) else data)
        with self._lock:
            self.chunks.append((label, buffer))
        return buffer

    def containing(self, needle: str) -> list[str]:
        """Labels of the recorded chunks that contain ``needle``, with a little context."""
        raw = needle.encode()
        found = []
        with self._lock:
            chunks = list(self.chunks)
        for label, data in chunks:
            at = data.find(raw)
            if at >= 0:
                context = bytes(data[max(0, at - 60) : at + len(raw) + 20]).decode(errors="replace")
                found.append(f"{label}: …{context}…")
        return found

    def __len__(self) -> int:
        return len(self.chunks)


class _TeeStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, sink: bytearray) -> None:
        self.inner = inner
        self.sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.sink.extend(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class RecordingTransport(httpx.HTTPTransport):
    """An ``httpx.HTTPTransport`` that records each response's headers and body bytes."""

    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        label = f"{request.method} {request.url.path} -> {response.status_code}"
        headers = "\n".join(
            f"{name.decode(errors='replace')}: {value.decode(errors='replace')}"
            for name, value in response.headers.raw
        )
        self.traffic.add(label + " (headers)", headers)
        sink = self.traffic.add(label + " (body)")
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _TeeStream(response.stream, sink)
        return response


def recording_client(
    url: str, traffic: Traffic, key: str | None = None, **headers: str
) -> httpx.Client:
    """An ``httpx.Client`` on ``url`` sending ``Authorization: Bearer KEY`` (when given), asking
    for JSON and for uncompressed bodies (so a grep of the recording sees the text)."""
    base = {"accept": JSON_MEDIA, "accept-encoding": "identity"}
    if key is not None:
        base["authorization"] = f"Bearer {key}"
    return httpx.Client(
        base_url=url,
        headers={**base, **headers},
        timeout=httpx.Timeout(60.0, connect=10.0),
        transport=RecordingTransport(traffic),
    )


# ---- the server and its keys -------------------------------------------------------------------


@dataclass
class Accounts:
    """The keyed server of the package: ``keys`` (name -> key) were made by the CLI before it
    started; ``secrets`` holds every key and key-like string a test sent (none may ever come
    back); ``traffic`` every response."""

    server: ServerProcess
    keys_file: Path
    keys: dict[str, str]
    admins: set[str]
    quotas: dict[str, dict[str, int]]  # name -> its per-key quota overrides
    defaults: dict[str, int]  # the server-wide quota defaults it was started with
    traffic: Traffic = field(default_factory=Traffic)
    secrets: list[str] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, name: str | None, **headers: str) -> httpx.Client:
        """A recording httpx client for key ``name`` (None: no Authorization header)."""
        client = recording_client(
            self.url, self.traffic, None if name is None else self.keys[name], **headers
        )
        self._closers.append(client.close)
        return client

    def raw(self, authorization: str | None, **headers: str) -> httpx.Client:
        """A recording httpx client sending ``Authorization: <authorization>`` verbatim."""
        if authorization is not None:
            headers["authorization"] = authorization
        client = recording_client(self.url, self.traffic, **headers)
        self._closers.append(client.close)
        return client

    def connect(self, name: str | None, *, api_key: str | None = None) -> Any:
        """The real client, ``hooklab.connect(url, api_key=…)`` for key ``name``, recorded."""
        import hooklab

        key = api_key if name is None else self.keys[name]
        model = hooklab.connect(self.url, api_key=key, timeout=60.0)
        record_client(model, self.traffic)
        self._closers.append(model.close)
        return model

    def limits_of(self, name: str) -> dict[str, int]:
        return {**self.defaults, **self.quotas.get(name, {})}

    def metrics(self) -> Metrics:
        with self.api(None) as client:
            response = client.get("/metrics", headers={"accept": "text/plain"})
        assert response.status_code == 200, f"/metrics: {response.status_code} {response.text}"
        return Metrics(response.text)

    def close(self) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):  # teardown of clients only
                close()
        self._closers.clear()


def record_client(model: Any, traffic: Traffic) -> None:
    """Swap a ``hooklab`` client's ``httpx.Client`` for a recording one with the same base URL,
    headers (the client's own ``Authorization``) and timeout."""
    old: httpx.Client = model._transport.client
    headers = httpx.Headers(old.headers)
    headers["accept-encoding"] = "identity"
    model._transport.client = httpx.Client(
        base_url=old.base_url,
        headers=headers,
        timeout=old.timeout,
        transport=RecordingTransport(traffic),
    )
    old.close()


# ---- answers -----------------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error envelope of a 4xx/5xx (asserting its shape and the x-request-id header)."""
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(
            f"{response.status_code} is not a JSON error envelope: {response.text[:300]!r}"
        ) from None
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str), error
    assert error["message"], error
    assert error.get("hint") is None or isinstance(error["hint"], str), error
    assert error.get("request_id") == response.headers.get("x-request-id"), (
        error,
        response.headers.get("x-request-id"),
    )
    return error


def assert_error(
    response: httpx.Response, status: int, code: str, says: str | None = None
) -> dict[str, Any]:
    """``response`` is ``status`` with error ``code``; ``says`` (a regex) matches its message."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.path}: expected {status} {code}, got "
        f"{response.status_code} {response.text[:400]}"
    )
    error = error_of(response)
    assert error["code"] == code, error
    if says is not None:
        assert re.search(says, error["message"]), f"message should match {says!r}: {error}"
    return error


def retry_after(response: httpx.Response) -> int:
    """The ``Retry-After`` header: present, an integer number of seconds, not negative."""
    value = response.headers.get("retry-after")
    assert value is not None, f"{response.status_code} without Retry-After: {response.text}"
    assert re.fullmatch(r"\d+", value.strip()), f"Retry-After {value!r} is not integer seconds"
    return int(value)


def json_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "F32", "shape": list(tensor.shape), "data": tensor.tolist()}


def tensor_from(response: httpx.Response, name: str) -> torch.Tensor:
    """Tensor ``name`` of a JSON tensors response: ``{"tensors": {name: {dtype, shape, data}}}``."""
    assert response.status_code == 200, f"{response.status_code} {response.text[:300]}"
    value = response.json()["tensors"][name]
    return torch.tensor(value["data"], dtype=torch.float32).reshape(value["shape"])


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes
    (the last falsy value is returned)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


# ---- the access log ----------------------------------------------------------------------------

_FIELD = re.compile(r"(?<![\w.])([a-z_]+)=(\S+)")
ACCESS_FIELDS = ("key", "method", "route", "status", "tokens", "bytes", "ms", "id")


def access_lines(log: str) -> list[dict[str, str]]:
    """The access-log lines in ``log`` (logger ``hooklab_server.access``: ``key=NAME method=POST
    route=/v1/forward status=200 tokens=N bytes=N ms=12.3 id=REQUEST_ID``), parsed into their
    fields: every line carrying all of those fields."""
    found = []
    for line in log.splitlines():
        fields = dict(_FIELD.findall(line))
        if all(name in fields for name in ACCESS_FIELDS):
            fields["_line"] = line
            found.append(fields)
    return found
