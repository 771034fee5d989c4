"""Cancellation of running work: a token set when the client goes away or the deadline passes,
checked by the work between layers, steps and chunks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

from hooklab_proto import ErrorCode

from .errors import RequestError

CancelReason = Literal["disconnect", "deadline"]


class _RunningToken(threading.local):
    """The token of the work this thread runs, for waits deep inside a forward (a paused
    callback) that must end when the work is cancelled."""

    value: CancelToken | None = None


running_token = _RunningToken()


class Cancelled(Exception):
    """The work stopped early; ``reason`` says why."""

    def __init__(self, reason: CancelReason) -> None:
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """Thread-safe: the event loop cancels, a worker thread checks."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self.deadline = clock() + timeout_s
        self._reason: CancelReason | None = None
        self._lock = threading.Lock()

    def cancel(self, reason: CancelReason) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    @property
    def reason(self) -> CancelReason | None:
        if self._reason is None and self._clock() >= self.deadline:
            self.cancel("deadline")
        return self._reason

    def check(self) -> None:
        """Raise :class:`Cancelled` when the work should stop."""
        reason = self.reason
        if reason is not None:
            raise Cancelled(reason)

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - self._clock())


def deadline_error(token: CancelToken) -> RequestError:
    return RequestError(
        ErrorCode.DEADLINE,
        f"the request ran past its deadline of {token.timeout_s:g} s",
        "send less work per request, or a larger timeout_s (up to the server's max_timeout_s)",
    )


def failure_error(failure: BaseException, token: CancelToken) -> RequestError | None:
    """What work that failed tells its client: the error to answer, or None when the client
    left (nobody to tell)."""
    if isinstance(failure, RequestError):
        return failure
    if isinstance(failure, Cancelled):
        return deadline_error(token) if failure.reason == "deadline" else None
    return RequestError(
        ErrorCode.INTERNAL,
        f"internal error: {type(failure).__name__}",
        "this is a server bug; the request id identifies it in the server's log",
    )
