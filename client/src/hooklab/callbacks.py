"""Hook functions that run here, called by the server mid-forward over a websocket.

The session opens on first need (``/v1/callbacks``) and stays open. A thread reads the server's
``call`` messages, runs the function on the activation it carries (with TransformerLens's
``fn(activation, hook)`` contract) and replies: ``unchanged`` when the function left the tensor
alone (its version counter says whether it was edited in place), ``replace`` with the new
values, or ``error``; the caller then re-raises the function's own exception.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, cast

import msgspec
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from hooklab_proto import decode_tensor, encode_tensor

from ._transport import Transport
from .tracing import StandInHook

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])
DEFAULT_TIMEOUT_S = 300.0


class CallbackSession:
    def __init__(self, transport: Transport, hook_of: Callable[[str], Any] | None = None):
        url = transport.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        headers = {
            key: value
            for key, value in transport.client.headers.items()
            if key.lower() == "authorization"
        }
        # Entered here and closed by close(): the session lives as long as the model.
        self.connection: ClientConnection = connect(
            f"{url}/v1/callbacks", additional_headers=headers, max_size=None, compression=None
        ).__enter__()
        hello = _decoder.decode(cast(bytes, self.connection.recv()))
        self.id: str = hello["session"]
        self.functions: dict[str, tuple[Callable[..., Any], str]] = {}
        self.hook_of = hook_of or (lambda name: StandInHook(name))
        self.timeout_s = DEFAULT_TIMEOUT_S
        self.failure: BaseException | None = None  # the last function error, re-raised
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self.bytes_received = 0  # callback messages, for a notebook's (or a benchmark's) tally
        self.bytes_sent = 0
        self._reader = threading.Thread(target=self._serve, name="hooklab-callbacks", daemon=True)
        self._reader.start()

    def register(self, fn: Callable[..., Any], hook_name: str) -> dict[str, Any]:
        """The wire fields of a callback hook entry for ``fn`` at ``hook_name``."""
        callback = f"cb{next(self._ids)}"
        with self._lock:
            self.functions[callback] = (fn, hook_name)
        return {"session": self.id, "callback": callback, "timeout_s": self.timeout_s}

    def forget(self, entries: list[dict[str, Any]]) -> None:
        """Drop the functions of a finished call."""
        with self._lock:
            for entry in entries:
                if entry.get("op") == "callback":
                    self.functions.pop(entry["callback"], None)

    @property
    def alive(self) -> bool:
        return not self._closed and self._reader.is_alive()

    def close(self) -> None:
        self._closed = True
        self.connection.close()

    # --- the reader thread -------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            for data in self.connection:
                if isinstance(data, bytes):
                    self.bytes_received += len(data)
                    message = _decoder.decode(data)
                    if message.get("kind") == "call":
                        answer = self._answer(message)
                        self.bytes_sent += len(answer)
                        self.connection.send(answer)
        except (ConnectionClosed, OSError):
            pass
        finally:
            self._closed = True

    def _answer(self, message: dict[str, Any]) -> bytes:
        call_id = message["id"]
        with self._lock:
            found = self.functions.get(message["callback"])
        if found is None:
            return _reply(call_id, "error", error="unknown callback (the call already ended)")
        fn, name = found
        _, received = decode_tensor(message["tensor"])
        activation = received.clone()  # writable, as TransformerLens's hook gets it
        version = activation._version
        try:
            returned = fn(activation, hook=self.hook_of(name))
        except BaseException as exc:  # the caller re-raises it; the server stops the forward
            self.failure = exc
            return _reply(call_id, "error", error=f"{type(exc).__name__}: {exc}")
        if returned is None or returned is activation:
            if activation._version == version:
                return _reply(call_id, "unchanged")
            returned = activation
        if not isinstance(returned, torch.Tensor):
            self.failure = TypeError(
                f"hook function at {name} returned {type(returned).__name__}, not a tensor"
            )
            return _reply(call_id, "error", error=str(self.failure))
        frame = encode_tensor(returned.detach().to("cpu").contiguous(), name).to_bytes()
        return _reply(call_id, "replace", tensor=frame)


def _reply(call_id: str, outcome: str, **fields: Any) -> bytes:
    return _encoder.encode({"kind": "reply", "id": call_id, "outcome": outcome, **fields})
