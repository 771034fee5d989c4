"""Per-key quotas over time: requests running at once and tokens per minute. (Stored bytes are
the store's, per-request sizes the operations'; all refusals are :class:`QuotaExceeded`.)

Tokens are charged when work is admitted — its estimate, so a burst cannot overshoot — and
settled to what it really ran when it ends (a generation that stops at eos, work cancelled).

:class:`MemoryQuotas` keeps the counts in this process; ``RedisQuotas`` (redis_quotas.py) in
Redis, so that they hold across API processes. Both refuse with the errors built here.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .auth import Account
from .ops.errors import QuotaExceeded

WINDOW_S = 60.0
UNLIMITED = 2**62  # the limit of an account without these quotas (open mode)


class Admission(Protocol):
    """A running request's hold on its key's quotas; ``settle`` corrects its token charge."""

    @property
    def tokens(self) -> int: ...

    @property
    def released(self) -> bool: ...

    def settle(self, tokens: int) -> None: ...

    def release(self) -> None:
        """Free the running slot (once; later calls do nothing)."""


class Quotas(Protocol):
    def admit(self, account: Account, tokens: int) -> Admission:
        """Hold a running slot and charge ``tokens``, or raise QuotaExceeded (with the time
        after which the same request would be admitted)."""

    def usage(self, account: Account) -> dict[str, int]:
        """``concurrent_requests`` running now and ``tokens_last_minute``."""


# --- shared by the implementations: limits, waits and the wording of refusals --------------


def limits(account: Account) -> tuple[int, int]:
    """The account's (concurrent_requests, tokens_per_minute) limits."""
    quotas = account.quotas
    return (
        quotas.get("concurrent_requests", UNLIMITED),
        quotas.get("tokens_per_minute", UNLIMITED),
    )


def wait_for(charges: Iterable[tuple[float, int]], excess: int, now: float) -> float:
    """Seconds until charges (``(at, tokens)``, oldest first) worth ``excess`` tokens leave
    the window."""
    freed = 0
    for at, tokens in charges:
        freed += tokens
        if freed >= excess:
            return at + WINDOW_S - now
    return WINDOW_S


def too_many_running(name: str, running: int, limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        "concurrent_requests",
        f"key {name!r} has {running} requests running, its quota concurrent_requests is {limit}",
        "wait for one to finish",
        retry_after=1.0,
    )


def larger_than_quota(name: str, tokens: int, limit: int) -> QuotaExceeded:
    """Waiting never helps: ``retry_after`` is None."""
    return QuotaExceeded(
        "tokens_per_minute",
        f"this request runs {tokens} tokens; key {name!r} may run "
        f"{limit} per minute (quota tokens_per_minute)",
        "split it into smaller requests",
        retry_after=None,
    )


def too_many_tokens(
    name: str, used: int, tokens: int, limit: int, retry_after: float
) -> QuotaExceeded:
    return QuotaExceeded(
        "tokens_per_minute",
        f"key {name!r} ran {used} tokens in the last minute; this request "
        f"needs {tokens} more and the quota tokens_per_minute is {limit}",
        "wait until earlier tokens leave the one-minute window",
        retry_after=retry_after,
    )


# --- in this process ------------------------------------------------------------------------


@dataclass
class _Charge:
    at: float
    tokens: int


@dataclass
class _Usage:
    running: int = 0
    charges: deque[_Charge] = field(default_factory=deque)  # within the window, oldest first

    def tokens(self) -> int:
        return sum(charge.tokens for charge in self.charges)


class MemoryAdmission:
    def __init__(self, quotas: MemoryQuotas, name: str, charge: _Charge) -> None:
        self.quotas, self.name, self._charge = quotas, name, charge
        self.released = False

    @property
    def tokens(self) -> int:
        return self._charge.tokens

    def settle(self, tokens: int) -> None:
        with self.quotas._lock:
            self._charge.tokens = tokens

    def release(self) -> None:
        with self.quotas._lock:
            if not self.released:
                self.released = True
                self.quotas._usage[self.name].running -= 1


class MemoryQuotas:
    """Quotas counted in this process (one API process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = defaultdict(_Usage)

    def _expire(self, usage: _Usage, now: float) -> None:
        while usage.charges and usage.charges[0].at <= now - WINDOW_S:
            usage.charges.popleft()

    def admit(self, account: Account, tokens: int) -> MemoryAdmission:
        running_limit, token_limit = limits(account)
        now = self._clock()
        with self._lock:
            usage = self._usage[account.name]
            self._expire(usage, now)
            if usage.running >= running_limit:
                raise too_many_running(account.name, usage.running, running_limit)
            if tokens > token_limit:
                raise larger_than_quota(account.name, tokens, token_limit)
            used = usage.tokens()
            if used + tokens > token_limit:
                charges = ((charge.at, charge.tokens) for charge in usage.charges)
                wait = wait_for(charges, used + tokens - token_limit, now)
                raise too_many_tokens(account.name, used, tokens, token_limit, wait)
            charge = _Charge(now, tokens)
            usage.charges.append(charge)
            usage.running += 1
        return MemoryAdmission(self, account.name, charge)

    def usage(self, account: Account) -> dict[str, int]:
        now = self._clock()
        with self._lock:
            usage = self._usage[account.name]
            self._expire(usage, now)
            return {
                "concurrent_requests": usage.running,
                "tokens_last_minute": usage.tokens(),
            }
