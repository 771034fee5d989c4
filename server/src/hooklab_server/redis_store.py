"""Stored tensors and caches in Redis, shared by every API process and worker, surviving
restarts (with AOF). The same :class:`~hooklab_server.store.Store` interface and limits as the
memory store.

Layout (``P`` is the key prefix):

    P:obj:<id>        hash: "info" (msgpack of StoredInfo), "t:<name>" (one tensor frame each);
                      expires with the object (PEXPIREAT)
    P:objects         zset: id -> expiry (Unix s)     P:by:<owner>  zset: the owner's ids
    P:info            hash: id -> "<owner> <charged>" (to settle the counters at expiry)
    P:owned           hash: owner -> charged bytes     P:used, P:count  totals

Every change of the counters happens in one Lua script (puts, deletes, and settling objects
past their expiry), so limits and quotas hold across processes. Payloads are proto tensor
frames — never pickle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import redis

from hooklab_proto import ErrorCode, TensorFrame, decode_frame, encode_tensor

from .auth import Account
from .ops.errors import RequestError
from .store import (
    Stored,
    StoredInfo,
    Value,
    new_info,
    not_found,
    over_object_count,
    over_quota,
    over_total_bytes,
    visible,
    wait_for_room,
)

Result = TypeVar("Result")

# Settle objects past their expiry: counters down, indexes cleaned. KEYS: objects, info, owned,
# used, count; ARGV: now, prefix.
_SETTLE = """
local function settle(now, prefix)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, id in ipairs(gone) do
    local info = redis.call('HGET', KEYS[2], id)
    if info then
      local owner, charged = string.match(info, '^(.*) (%d+)$')
      redis.call('HINCRBY', KEYS[3], owner, -tonumber(charged))
      redis.call('DECRBY', KEYS[4], charged)
      redis.call('DECR', KEYS[5])
      redis.call('HDEL', KEYS[2], id)
      redis.call('ZREM', prefix .. ':by:' .. owner, id)
    end
    redis.call('ZREM', KEYS[1], id)
    redis.call('DEL', prefix .. ':obj:' .. id)
  end
end
"""

# KEYS: objects, info, owned, used, count, obj key, by-owner key.
# ARGV: now, prefix, id, owner, charged, expires_at, owner limit (-1: none), max bytes,
#       max objects, then field, value pairs of the object's hash.
_PUT = (
    _SETTLE
    + """
local now, prefix = tonumber(ARGV[1]), ARGV[2]
settle(now, prefix)
local id, owner, charged = ARGV[3], ARGV[4], tonumber(ARGV[5])
local expires, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
local owned = tonumber(redis.call('HGET', KEYS[3], owner) or '0')
if limit >= 0 and owned + charged > limit then return {'quota', owned} end
local count = tonumber(redis.call('GET', KEYS[5]) or '0')
if count >= tonumber(ARGV[9]) then return {'count', count} end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used + charged > tonumber(ARGV[8]) then return {'bytes', used} end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIREAT', KEYS[6], math.floor(expires * 1000))
redis.call('ZADD', KEYS[1], expires, id)
redis.call('ZADD', KEYS[7], expires, id)
redis.call('HSET', KEYS[2], id, owner .. ' ' .. charged)
redis.call('HINCRBY', KEYS[3], owner, charged)
redis.call('INCRBY', KEYS[4], charged)
redis.call('INCR', KEYS[5])
return {'ok', 0}
"""
)

# KEYS: objects, info, owned, used, count; ARGV: now, prefix, id.
_DELETE = (
    _SETTLE
    + """
settle(tonumber(ARGV[1]), ARGV[2])
local id = ARGV[3]
local info = redis.call('HGET', KEYS[2], id)
if not info then return 0 end
redis.call('ZADD', KEYS[1], 0, id)  -- due at once: settling it deletes it like an expiry
settle(0, ARGV[2])
return 1
"""
)

# KEYS: objects, info, owned, used, count; ARGV: now, prefix.
_SETTLE_ONLY = _SETTLE + "\nsettle(tonumber(ARGV[1]), ARGV[2])\nreturn 1\n"

_INFO = msgspec.msgpack.Encoder()
_INFO_DECODER = msgspec.msgpack.Decoder(StoredInfo)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def unavailable(exc: Exception) -> RequestError:
    """Redis does not answer (the store, the quotas or the job queue): 503, retry soon."""
    return RequestError(
        ErrorCode.UNAVAILABLE,
        f"Redis does not answer ({type(exc).__name__}): stored objects, quotas and jobs live there",
        "retry in a moment (nothing stored is lost); if it lasts, the operator should check "
        "redis-server",
        retry_after=1.0,
    )


def answered(fn: Callable[[], Result]) -> Result:
    """``fn()``, with Redis not answering turned into :func:`unavailable`."""
    try:
        return fn()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unavailable(exc) from None


class RedisStore:
    def __init__(
        self,
        client: redis.Redis,
        max_bytes: int,
        ttl_s: float,
        max_objects: int = 10_000,
        prefix: str = "hooklab",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.max_bytes, self.ttl_s, self.max_objects = max_bytes, ttl_s, max_objects
        self.prefix = prefix
        self._clock = clock
        self._counters = [
            f"{prefix}:{name}" for name in ("objects", "info", "owned", "used", "count")
        ]
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._settle = client.register_script(_SETTLE_ONLY)

    def _key(self, object_id: str) -> str:
        return f"{self.prefix}:obj:{object_id}"

    # --- the Store interface ----------------------------------------------------------------

    def put(
        self,
        kind: str,
        value: Value,
        owner: Account,
        ttl_s: float | None = None,
        details: dict[str, str | int] | None = None,
    ) -> StoredInfo:
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        now = self._clock()
        info = new_info(kind, value, owner.name, now + ttl, details)
        fields: list[Any] = ["info", _INFO.encode(info)]
        tensors = value.items() if isinstance(value, dict) else [("", value)]
        for name, tensor in tensors:
            fields += [f"t:{name}", encode_tensor(tensor.detach(), name).to_bytes()]
        limit = owner.quotas.get("stored_bytes", -1)
        keys = [*self._counters, self._key(info.id), f"{self.prefix}:by:{owner.name}"]
        args: list[Any] = [
            now, self.prefix, info.id, owner.name, info.charged_bytes, info.expires_at, limit,
            self.max_bytes, self.max_objects, *fields,
        ]  # fmt: skip
        answer: Any = answered(lambda: self._put(keys=keys, args=args))
        outcome, used = _text(answer[0]), int(answer[1])
        if outcome == "quota":
            owned = self.listing_of(owner.name)
            excess = used + info.charged_bytes - limit
            raise over_quota(info, used, limit, wait_for_room(owned, excess, now))
        if outcome == "count":
            raise over_object_count(self.max_objects)
        if outcome == "bytes":
            raise over_total_bytes(info, used, self.max_bytes)
        return info

    def get(self, kind: str, object_id: str, caller: Account) -> Stored:
        fields: dict[Any, Any] = answered(lambda: self.redis.hgetall(self._key(object_id)))
        if b"info" not in fields:
            raise not_found(kind, object_id)
        info = _INFO_DECODER.decode(fields[b"info"])
        if not visible(info, kind, caller) or info.expires_at <= self._clock():
            raise not_found(kind, object_id)
        tensors = {}
        for field, frame in fields.items():
            if field.startswith(b"t:"):
                decoded = decode_frame(frame)
                assert isinstance(decoded, TensorFrame)
                tensors[decoded.name] = decoded.tensor
        value: Value = tensors[""] if kind == "tensor" else tensors
        return Stored(info, value)

    def delete(self, kind: str, object_id: str, caller: Account) -> None:
        self.get(kind, object_id, caller)  # the same 404 for missing and someone else's
        args: list[Any] = [self._clock(), self.prefix, object_id]
        answered(lambda: self._delete(keys=self._counters, args=args))

    def listing(self, kind: str, caller: Account) -> list[StoredInfo]:
        if caller.admin:
            return [info for info in self._infos(f"{self.prefix}:objects") if info.kind == kind]
        return [info for info in self.listing_of(caller.name) if visible(info, kind, caller)]

    def listing_of(self, owner: str) -> list[StoredInfo]:
        return self._infos(f"{self.prefix}:by:{owner}")

    def bytes_by_owner(self) -> dict[str, int]:
        self._settle_expired()
        owned: dict[Any, Any] = answered(lambda: self.redis.hgetall(f"{self.prefix}:owned"))
        return {_text(name): int(size) for name, size in owned.items() if int(size)}

    # --- helpers ----------------------------------------------------------------------------

    def _settle_expired(self) -> None:
        args: list[Any] = [self._clock(), self.prefix]
        answered(lambda: self._settle(keys=self._counters, args=args))

    def _infos(self, index: str) -> list[StoredInfo]:
        self._settle_expired()
        ids: list[Any] = answered(lambda: self.redis.zrangebyscore(index, self._clock(), "+inf"))
        pipe = self.redis.pipeline(transaction=False)
        for object_id in ids:
            pipe.hget(self._key(_text(object_id)), "info")
        found = answered(pipe.execute)
        return [_INFO_DECODER.decode(raw) for raw in found if raw is not None]
