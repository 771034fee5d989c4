"""The executor's books: the fair queue behind its lock, the jobs still live, and the metrics
that follow each job from its submission to its end.

Both threads use it: the event loop submits jobs; the executor thread picks them, starts them,
records their units and ends them. A job's end is counted here before its caller hears of it,
so the metrics never lag the answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hooklab_proto import ErrorCode

from ..memory import TRIM_ABOVE_BYTES, release_memory
from ..metrics import Metrics
from ..ops import Cancelled, GenerateWork, RequestError
from ..ops.cancel import CancelReason
from .policy import FairQueue, Job, QueueFull, drop_where
from .runs import Outcome, Run, run_of


class Ledger:
    def __init__(
        self, queue: FairQueue, metrics: Metrics, running_outside_queue: Callable[[], int]
    ) -> None:
        self.metrics = metrics
        self._queue = queue  # not thread-safe: every call holds the lock
        self._lock = threading.Lock()
        self._live: set[Job] = set()  # submitted, not yet finished
        self._running_outside_queue = running_outside_queue  # generations decoding in the pool

    # --- the event loop's side --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; RequestError QUEUE_FULL over a bound of the queue."""
        with self._lock:
            self._live.add(job)
            try:
                self._queue.submit(job)
            except QueueFull as full:
                self._live.discard(job)
                raise RequestError(
                    ErrorCode.QUEUE_FULL, full.message, "retry later", full.retry_after
                ) from None
        self.metrics.add("inflight_requests", 1, op=run_of(job).work.op)
        self.publish()

    def is_live(self, job: Job) -> bool:
        with self._lock:
            return job in self._live

    def publish(self) -> None:
        """The queue's state as gauges."""
        with self._lock:
            jobs = self._queue.jobs()
            reserved = self._queue.reserved - self._queue.reserved_by_executor
        self.metrics.set("queue_depth", sum(job.started is None for job in jobs))
        running = sum(job.started is not None for job in jobs) + self._running_outside_queue()
        self.metrics.set("running_jobs", running)
        self.metrics.set("inflight_bytes", reserved)

    def depth_by_key(self) -> dict[str, float]:
        with self._lock:
            return {key: float(n) for key, n in self._queue.depth_by_key().items()}

    # --- the executor thread's side: the queue ----------------------------------------------

    def next_job(self, ready: Callable[[Job], bool]) -> Job | None:
        """Drop the queued jobs whose client left or whose deadline passed, then pick the job
        whose unit runs next (None: nothing can run now)."""
        with self._lock:
            gone = drop_where(self._queue, lambda job: run_of(job).token.reason is not None)
            job = self._queue.next(ready)
        for stopped in gone:
            self.stop(stopped)
        return job

    def depth(self) -> int:
        with self._lock:
            return self._queue.depth()

    def take_along(self, first: Job, accept: Callable[[Job], bool]) -> list[Job]:
        with self._lock:
            return self._queue.take_along(first, accept)

    def park(self, job: Job) -> None:
        with self._lock:
            self._queue.park(job)

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            self._queue.reserve(nbytes)

    # --- the executor thread's side: a job's life -------------------------------------------

    def started(self, job: Job, now: float) -> None:
        """The job's unit starts at ``now``: the first one ends its wait in the queue."""
        run = run_of(job)
        if job.started is None:
            job.started = now
            run.stats["queued_s"] = now - run.queued_at
            run.stats["units_waited"] = job.units_waited
            self.metrics.observe("queue_seconds", now - run.queued_at, op=run.work.op)
            self.publish()

    def ran(self, job: Job, seconds: float, next_cost: float) -> None:
        """A unit of the job ran in ``seconds``; the next one costs ``next_cost``."""
        run_of(job).run_s += seconds
        with self._lock:
            self._queue.ran(job, job.cost, seconds, next_cost)
        self.publish()

    def finish(self, job: Job, outcome: Outcome, seconds: float) -> None:
        """The job's last unit ran in ``seconds``: it ended with a result, a failure, or
        stopped (Cancelled)."""
        run = run_of(job)
        run.run_s += seconds
        with self._lock:
            self._queue.ran(job, job.cost, seconds, None)
            self._live.discard(job)
        if isinstance(outcome, Cancelled):
            self._count_cancelled(job, outcome.reason)
        elif isinstance(outcome, BaseException) and isinstance(run.work, GenerateWork):
            self.metrics.add("generations_failed")
        self.publish()
        self.metrics.add("inflight_requests", -1, op=run.work.op)
        run.stats["run_s"] = run.run_s
        run.stats["units"] = job.units_run
        self.metrics.observe("run_seconds", run.run_s, op=run.work.op)
        run.send(outcome)
        _trim(run)

    def stop(self, job: Job) -> None:
        """A job dropped from the queue (waiting, or between units) because its client left or
        its deadline passed."""
        run = run_of(job)
        with self._lock:
            self._live.discard(job)
        reason = run.token.reason or "disconnect"
        self._count_cancelled(job, reason)
        self.metrics.add("inflight_requests", -1, op=run.work.op)
        self.publish()
        run.steps.close()
        run.send(Cancelled(reason))
        _trim(run)

    def _count_cancelled(self, job: Job, reason: CancelReason) -> None:
        work = run_of(job).work
        self.metrics.add("cancelled", op=work.op, reason=reason)
        if isinstance(work, GenerateWork) and job.started is not None:
            self.metrics.add("generations_cancelled")


def _trim(run: Run) -> None:
    """Big work hands the memory it freed back to the system when it ends."""
    if run.work.cost.peak_bytes > TRIM_ABOVE_BYTES:
        release_memory()
