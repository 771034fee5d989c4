"""Client callbacks when scaled out: the websocket ends at an API process, the paused forward
runs in a worker, and Redis carries the messages between them.

A session is a key naming its owner (kept alive while the socket is open) and a list of calls:
the worker pushes each ``call`` there and waits on that call's reply list; the API process
holding the socket pops the calls, sends them, and pushes the client's reply — only for calls
it sent on that session, so no client can answer another's. When the socket closes, the API
pushes ``ended`` to the calls still open, and the forwards stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from hooklab_proto import ErrorCode

from ..callbacks import (
    POLL_S,
    CallbackFailed,
    decode_message,
    encode_message,
    new_session_id,
)
from ..ops.cancel import Cancelled, running_token
from ..ops.errors import RequestError
from .keys import RedisKeys

SESSION_TTL_S = 60  # the owner key outlives a crashed API process by at most this
REFRESH_S = 20.0
REPLY_TTL_S = 60
_ENDED = encode_message("ended")


@dataclass(eq=False)
class RedisSession:
    id: str
    owner: str
    sent: set[str] = field(default_factory=set)  # calls sent to the client, not yet answered
    keeper: asyncio.Task[None] | None = None


class RedisCallbackSessions:
    """The API side: sessions of the sockets this process holds."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self.redis, self.keys = client, keys

    async def open(self, owner: str) -> RedisSession:
        session = RedisSession(new_session_id(), owner)
        await self.redis.set(self.keys.callback_owner(session.id), owner, ex=SESSION_TTL_S)
        session.keeper = asyncio.create_task(self._keep(session))
        return session

    async def _keep(self, session: RedisSession) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            with contextlib.suppress(redis.RedisError):
                await self.redis.expire(self.keys.callback_owner(session.id), SESSION_TTL_S)

    async def messages(self, session: RedisSession) -> AsyncIterator[bytes]:
        calls = self.keys.callback_calls(session.id)
        while True:
            popped = await self.redis.blpop([calls], timeout=1)
            if popped is None:
                continue
            message = cast(bytes, popped[1])
            session.sent.add(str(decode_message(message).get("id")))
            yield message

    async def reply(self, session: RedisSession, message: dict[str, Any]) -> None:
        call_id = str(message.get("id"))
        if call_id not in session.sent:
            return  # not a call of this session's
        session.sent.discard(call_id)
        await self._push(call_id, encode_message(**message))

    async def close(self, session: RedisSession) -> None:
        if session.keeper is not None:
            session.keeper.cancel()
        with contextlib.suppress(redis.RedisError):
            await self.redis.delete(self.keys.callback_owner(session.id))
            for call_id in session.sent:
                await self._push(call_id, _ENDED)
            session.sent.clear()

    async def _push(self, call_id: str, data: bytes) -> None:
        reply = self.keys.callback_reply(call_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, data)
            pipe.expire(reply, REPLY_TTL_S)
            await pipe.execute()


class RedisCallbackRelay:
    """The side of a paused forward (a worker's thread; the API's for validation)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis, self.keys = client, keys

    def check(self, session: str, owner: str) -> None:
        found = self.redis.get(self.keys.callback_owner(session))
        if found is None or cast(bytes, found).decode() != owner:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"callback session {session!r} is not open",
                "the client opens it at /v1/callbacks before sending callback hooks",
            )

    def call(self, session: str, message: bytes, call_id: str, timeout_s: float) -> dict[str, Any]:
        owner_key = self.keys.callback_owner(session)
        calls = self.keys.callback_calls(session)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(owner_key)
            pipe.rpush(calls, message)
            pipe.expire(calls, REPLY_TTL_S)
            alive, _, _ = pipe.execute()
        if not alive:
            raise CallbackFailed("the callback session ended (the client disconnected)")
        deadline = time.monotonic() + timeout_s
        token = running_token.value
        reply_key = self.keys.callback_reply(call_id)
        while True:
            popped = self.redis.blpop([reply_key], timeout=POLL_S * 2)
            if popped is not None:
                reply = decode_message(cast(bytes, popped[1]))
                if reply["kind"] == "ended":
                    raise CallbackFailed("the callback session ended (the client disconnected)")
                return reply
            if token is not None and token.reason is not None:
                raise Cancelled(token.reason)
            if time.monotonic() >= deadline:
                raise CallbackFailed(
                    f"the client's hook function did not answer within {timeout_s:g} s",
                    "a callback's timeout_s (client: callback_timeout_s) sets how long to wait",
                )
            if not self.redis.exists(owner_key):
                raise CallbackFailed("the callback session ended (the client disconnected)")
