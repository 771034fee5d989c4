"""Per-key quotas over time: requests running at once and tokens per minute. (Stored bytes are
the store's, per-request sizes the operations'; all refusals are :class:`QuotaExceeded`.)

Tokens are charged when work is admitted — its estimate, so a burst cannot overshoot — and
settled to what it really ran when it ends (a generation that stops at eos, work cancelled).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .auth import Account
from .ops.errors import QuotaExceeded

WINDOW_S = 60.0


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


class Admission:
    """A running request's hold on its key's quotas; ``settle`` corrects its token charge."""

    def __init__(self, quotas: Quotas, name: str, charge: _Charge) -> None:
        self.quotas, self.name, self._charge = quotas, name, charge
        self.released = False

    @property
    def tokens(self) -> int:
        return self._charge.tokens

    def settle(self, tokens: int) -> None:
        with self.quotas._lock:
            self._charge.tokens = tokens

    def release(self) -> None:
        """Free the running slot (once; later calls do nothing)."""
        with self.quotas._lock:
            if not self.released:
                self.released = True
                self.quotas._usage[self.name].running -= 1


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = defaultdict(_Usage)

    def _expire(self, usage: _Usage, now: float) -> None:
        while usage.charges and usage.charges[0].at <= now - WINDOW_S:
            usage.charges.popleft()

    def admit(self, account: Account, tokens: int) -> Admission:
        """Hold a running slot and charge ``tokens``, or raise QuotaExceeded (with the time
        after which the same request would be admitted)."""
        unlimited = 2**62  # an account without these quotas (open mode)
        running_limit = account.quotas.get("concurrent_requests", unlimited)
        token_limit = account.quotas.get("tokens_per_minute", unlimited)
        now = self._clock()
        with self._lock:
            usage = self._usage[account.name]
            self._expire(usage, now)
            if usage.running >= running_limit:
                raise QuotaExceeded(
                    "concurrent_requests",
                    f"key {account.name!r} has {usage.running} requests running, its quota "
                    f"concurrent_requests is {running_limit}",
                    "wait for one to finish",
                    retry_after=1.0,
                )
            if tokens > token_limit:
                raise QuotaExceeded(
                    "tokens_per_minute",
                    f"this request runs {tokens} tokens; key {account.name!r} may run "
                    f"{token_limit} per minute (quota tokens_per_minute)",
                    "split it into smaller requests",
                    retry_after=None,
                )
            used = usage.tokens()
            if used + tokens > token_limit:
                raise QuotaExceeded(
                    "tokens_per_minute",
                    f"key {account.name!r} ran {used} tokens in the last minute; this request "
                    f"needs {tokens} more and the quota tokens_per_minute is {token_limit}",
                    "wait until earlier tokens leave the one-minute window",
                    retry_after=self._wait_for(usage, used + tokens - token_limit, now),
                )
            charge = _Charge(now, tokens)
            usage.charges.append(charge)
            usage.running += 1
        return Admission(self, account.name, charge)

    @staticmethod
    def _wait_for(usage: _Usage, excess: int, now: float) -> float:
        """Seconds until charges worth ``excess`` tokens leave the window."""
        freed = 0
        for charge in usage.charges:
            freed += charge.tokens
            if freed >= excess:
                return charge.at + WINDOW_S - now
        return WINDOW_S

    def usage(self, account: Account) -> dict[str, int]:
        now = self._clock()
        with self._lock:
            usage = self._usage[account.name]
            self._expire(usage, now)
            return {
                "concurrent_requests": usage.running,
                "tokens_last_minute": usage.tokens(),
            }
