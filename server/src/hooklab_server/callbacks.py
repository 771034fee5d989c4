"""Client callbacks: a forward pauses at a hook point until the client's function has run.

A client opens a callback session (the websocket at ``/v1/callbacks``, in ``api/callbacks``);
its requests name the session in their callback hook entries. At each firing the forward's
thread sends the activation to the session as a ``call`` message and blocks until the
``reply`` (the activation unchanged, replaced, or the function's error), the timeout, or the
session's end. Messages are msgpack maps; tensors inside them are proto tensor frames.

Two relays carry the messages: :class:`LocalCallbacks` when the forward runs in the process
holding the websocket, and ``remote.callbacks`` through Redis when a worker runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import torch

from hooklab_proto import ErrorCode, decode_tensor, encode_tensor

from .ops.cancel import Cancelled, running_token
from .ops.errors import RequestError

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])
POLL_S = 0.1  # how often a paused forward looks whether its request was cancelled


class CallbackFailed(RequestError):
    """The forward stopped at a callback: it timed out, the client's function raised, or the
    session ended."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(ErrorCode.CALLBACK_FAILED, message, hint)


def encode_message(kind: str, **fields: Any) -> bytes:
    return _encoder.encode({"kind": kind, **fields})


def decode_message(data: bytes) -> dict[str, Any]:
    try:
        message = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise CallbackFailed(f"a callback message is not a msgpack map: {exc}") from None
    if not isinstance(message.get("kind"), str):
        raise CallbackFailed("a callback message has no 'kind'")
    return message


def call_message(call_id: str, callback: str, hook: str, activation: torch.Tensor) -> bytes:
    frame = encode_tensor(activation.detach().to("cpu").contiguous(), hook).to_bytes()
    return encode_message("call", id=call_id, callback=callback, hook=hook, tensor=frame)


def replied_tensor(
    reply: dict[str, Any], activation: torch.Tensor, hook: str
) -> torch.Tensor | None:
    """The activation a reply leaves: None (unchanged) or the replacement, checked against
    the activation's shape before it is used."""
    outcome = reply.get("outcome")
    if outcome == "error":
        raise CallbackFailed(
            f"the hook function at {hook!r} raised on the client: {str(reply.get('error'))[:500]}"
        )
    if outcome == "unchanged":
        return None
    if outcome != "replace" or not isinstance(reply.get("tensor"), bytes):
        raise CallbackFailed(f"invalid callback reply at {hook!r}: outcome {outcome!r}")
    try:
        _, tensor = decode_tensor(reply["tensor"])
    except Exception as exc:  # a malformed frame: the client's fault, reported as such
        raise CallbackFailed(f"invalid tensor in the callback reply at {hook!r}: {exc}") from None
    if tuple(tensor.shape) != tuple(activation.shape):
        raise CallbackFailed(
            f"the hook function at {hook!r} returned shape {list(tensor.shape)} for an "
            f"activation of shape {list(activation.shape)}"
        )
    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
        raise CallbackFailed(f"the hook function at {hook!r} returned NaN or infinite values")
    return tensor.to(activation.device, activation.dtype)


class CallbackRelay(Protocol):
    """What a paused forward uses (from its own thread)."""

    def check(self, session: str, owner: str) -> None:
        """RequestError unless ``session`` is open and belongs to ``owner``."""

    def call(self, session: str, message: bytes, call_id: str, timeout_s: float) -> dict[str, Any]:
        """Send ``message`` to the session's client; its reply (CallbackFailed on timeout or
        when the session ends first)."""


class CallbackSessions(Protocol):
    """What the websocket uses (on the event loop): open a session, hand it replies, close it.
    A session has an ``id`` and ``messages()``, the calls to send to its client."""

    async def open(self, owner: str) -> Any: ...

    def messages(self, session: Any) -> AsyncIterator[bytes]: ...

    async def reply(self, session: Any, message: dict[str, Any]) -> None: ...

    async def close(self, session: Any) -> None: ...


class SessionEnded(Exception):
    pass


@dataclass(eq=False)
class Session:
    """One client's open callback websocket, in this process."""

    id: str
    owner: str
    loop: asyncio.AbstractEventLoop
    outbound: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    pending: dict[str, concurrent.futures.Future[dict[str, Any]]] = field(default_factory=dict)
    closed: bool = False

    async def messages(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.outbound.get()

    def reply(self, message: dict[str, Any]) -> None:
        future = self.pending.pop(str(message.get("id")), None)
        if future is not None and not future.done():
            future.set_result(message)


def new_session_id() -> str:
    return "cb_" + secrets.token_hex(12)


class LocalCallbacks:
    """Sessions held by this process, and the relay for forwards running in it."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # --- the websocket's side (event loop) ---------------------------------------------------

    async def open(self, owner: str) -> Session:
        session = Session(new_session_id(), owner, asyncio.get_running_loop())
        with self._lock:
            self.sessions[session.id] = session
        return session

    def messages(self, session: Session) -> AsyncIterator[bytes]:
        return session.messages()

    async def reply(self, session: Session, message: dict[str, Any]) -> None:
        session.reply(message)

    async def close(self, session: Session) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)
            session.closed = True
            pending, session.pending = session.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(SessionEnded())

    # --- the forward's side (its own thread) -------------------------------------------------

    def check(self, session: str, owner: str) -> None:
        found = self.sessions.get(session)
        if found is None or found.owner != owner:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"callback session {session!r} is not open",
                "the client opens it at /v1/callbacks before sending callback hooks",
            )

    def call(self, session: str, message: bytes, call_id: str, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            found = self.sessions.get(session)
            if found is None or found.closed:
                raise CallbackFailed("the callback session ended (the client disconnected)")
            future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            found.pending[call_id] = future
        found.loop.call_soon_threadsafe(found.outbound.put_nowait, message)
        return wait_reply(future, timeout_s, lambda: found.pending.pop(call_id, None))


def wait_reply(
    future: concurrent.futures.Future[dict[str, Any]], timeout_s: float, forget: Any
) -> dict[str, Any]:
    """The reply, waited for in short slices so a cancelled request stops waiting at once."""
    deadline = time.monotonic() + timeout_s
    token = running_token.value
    while True:
        try:
            return future.result(timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            if token is not None and token.reason is not None:
                forget()
                raise Cancelled(token.reason) from None
            if time.monotonic() >= deadline:
                forget()
                raise CallbackFailed(
                    f"the client's hook function did not answer within {timeout_s:g} s",
                    "a callback's timeout_s (client: callback_timeout_s) sets how long to wait",
                ) from None
        except SessionEnded:
            raise CallbackFailed("the callback session ended (the client disconnected)") from None
