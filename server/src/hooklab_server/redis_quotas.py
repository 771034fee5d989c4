"""Per-key quotas counted in Redis, so they hold across API processes: the same
:class:`~hooklab_server.quotas.Quotas` interface, limits and refusals as the memory one.

Layout (``P`` is the key prefix, ``K`` the key's name, ``id`` one admission's):

    P:quota:K:running   zset: id -> lease expiry (Unix s); only unexpired leases count, so
                        the slot of a process that died without releasing comes back
    P:quota:K:charges   zset: id -> charged at (Unix s), the one-minute window
    P:quota:K:tokens    hash: id -> tokens charged (settle corrects it)

Each key expires by itself once idle (after the longest lease, or the window). Every check and
charge happens in one Lua script, so limits hold when several processes admit at once. Times
travel as the strings Python wrote, never as Lua numbers (which would round them to 14 digits).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from .auth import Account
from .quotas import (
    WINDOW_S,
    larger_than_quota,
    limits,
    too_many_running,
    too_many_tokens,
    wait_for,
)
from .redis_store import answered

# Drop leases past expiry and charges out of the window; sum what the window holds.
# KEYS: running, charges, tokens.
_COMMON = """
local function prune(now, cutoff)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  for _, id in ipairs(gone) do redis.call('HDEL', KEYS[3], id) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
end

-- The window's charges (id, at pairs, oldest first), tokens by id, and their total.
local function charged()
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local amounts = redis.call('HGETALL', KEYS[3])
  local by_id = {}
  for i = 1, #amounts, 2 do by_id[amounts[i]] = tonumber(amounts[i + 1]) end
  local used = 0
  for i = 1, #entries, 2 do used = used + (by_id[entries[i]] or 0) end
  return entries, by_id, used
end
"""

# ARGV: now, window cutoff, lease expiry, lease ms, window ms, id, tokens, running limit,
# token limit. Answers {'ok'}, {'running', n}, {'large'} or {'tokens', used, at, tokens, ...}.
_ADMIT = (
    _COMMON
    + """
prune(ARGV[1], ARGV[2])
local running = redis.call('ZCARD', KEYS[1])
if running >= tonumber(ARGV[8]) then return {'running', running} end
local tokens, limit = tonumber(ARGV[7]), tonumber(ARGV[9])
if tokens > limit then return {'large'} end
local entries, by_id, used = charged()
if used + tokens > limit then
  local answer = {'tokens', used}
  for i = 1, #entries, 2 do
    answer[#answer + 1] = entries[i + 1]
    answer[#answer + 1] = by_id[entries[i]] or 0
  end
  return answer
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[6])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return {'ok'}
"""
)

# ARGV: now, window cutoff. Answers {running, tokens in the window}.
_USAGE = (
    _COMMON
    + """
prune(ARGV[1], ARGV[2])
local _, _, used = charged()
return {redis.call('ZCARD', KEYS[1]), used}
"""
)

# KEYS: charges, tokens; ARGV: id, tokens, window ms. A charge already out of the window
# stays out (as in memory, where it no longer counts).
_SETTLE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisAdmission:
    def __init__(self, quotas: RedisQuotas, keys: list[str], admission_id: str, tokens: int):
        self._quotas, self._keys, self._id = quotas, keys, admission_id
        self._tokens = tokens
        self.released = False

    @property
    def tokens(self) -> int:
        return self._tokens

    def settle(self, tokens: int) -> None:
        args: list[Any] = [self._id, tokens, _ms(WINDOW_S)]
        answered(lambda: self._quotas._settle(keys=self._keys[1:], args=args))
        self._tokens = tokens

    def release(self) -> None:
        if self.released:
            return
        client, running = self._quotas.redis, self._keys[0]
        answered(lambda: client.zrem(running, self._id))
        self.released = True  # only once Redis has it: a failed release may be retried


class RedisQuotas:
    """Quotas counted in Redis, shared by every API process using the same Redis and prefix.

    ``lease_s`` bounds how long a running slot outlives a process that died holding it: keep
    it above the longest a request may run. ``clock`` gives Unix time (shared by processes).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "hooklab",
        lease_s: float = 660.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.prefix, self.lease_s = prefix, lease_s
        self._clock = clock
        self._admit = client.register_script(_ADMIT)
        self._usage = client.register_script(_USAGE)
        self._settle = client.register_script(_SETTLE)

    def _keys(self, name: str) -> list[str]:
        return [f"{self.prefix}:quota:{name}:{part}" for part in ("running", "charges", "tokens")]

    def admit(self, account: Account, tokens: int) -> RedisAdmission:
        running_limit, token_limit = limits(account)
        now = self._clock()
        keys, admission_id = self._keys(account.name), uuid.uuid4().hex
        args: list[Any] = [
            now, now - WINDOW_S, now + self.lease_s, _ms(self.lease_s), _ms(WINDOW_S),
            admission_id, tokens, running_limit, token_limit,
        ]  # fmt: skip
        answer: list[Any] = answered(lambda: self._admit(keys=keys, args=args))
        outcome = answer[0].decode()
        if outcome == "running":
            raise too_many_running(account.name, int(answer[1]), running_limit)
        if outcome == "large":
            raise larger_than_quota(account.name, tokens, token_limit)
        if outcome == "tokens":
            used = int(answer[1])
            charges = [
                (float(at), int(n)) for at, n in zip(answer[2::2], answer[3::2], strict=True)
            ]
            wait = wait_for(charges, used + tokens - token_limit, now)
            raise too_many_tokens(account.name, used, tokens, token_limit, wait)
        return RedisAdmission(self, keys, admission_id, tokens)

    def usage(self, account: Account) -> dict[str, int]:
        now = self._clock()
        keys, args = self._keys(account.name), [now, now - WINDOW_S]
        running, used = answered(lambda: self._usage(keys=keys, args=args))
        return {"concurrent_requests": int(running), "tokens_last_minute": int(used)}
