"""Which job runs its next unit: deficit round robin across keys, weighted by cost, with bounded
queues and admission by memory. Pure policy — no threads, no torch — so its order can be tested
exactly.

Each key has a FIFO of jobs. Keys with work sit in a ring; a visit adds a quantum to the key's
deficit (capped, so an idle key banks no burst) and the key runs units while their cost fits the
deficit. The quantum adapts: the largest next-unit cost among the keys waiting, so a key whose
units are small runs as many as one large unit of another key costs (shares follow cost), and a
key whose units are large runs one before a waiting key's turn (a light request waits at most
one chunk of a heavy sweep). A job of many units (a patching sweep, a generation) stays at the
front of its key's queue between units, so one user's 50 requests do not starve another's one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Job:
    """A piece of work waiting for (or between) units. ``cost`` is its next unit's estimated
    cost (tokens x layers); ``reserve_bytes`` the memory it holds while admitted."""

    key: str
    cost: float
    reserve_bytes: int
    submitted: float
    payload: Any = None  # the executor's own state for the job
    admitted: bool = False  # holds its memory reservation
    units_run: int = 0
    units_waited: int = 0  # units other jobs ran before this one's first
    started: float | None = None


class QueueFull(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass
class _Key:
    jobs: deque[Job] = field(default_factory=deque)
    deficit: float = 0.0
    in_turn: bool = False  # it is the ring's head and has run a unit this visit


class FairQueue:
    """Not thread-safe: the executor serialises calls (it holds one lock around them)."""

    def __init__(
        self,
        quantum: float,
        max_per_key: int,
        max_total: int,
        memory_budget: int,
    ) -> None:
        self.quantum = quantum
        self.max_per_key = max_per_key
        self.max_total = max_total
        self.memory_budget = memory_budget
        self.reserved = 0  # bytes held by admitted jobs and by the executor itself
        self.reserved_by_executor = 0
        self.units_run = 0  # every unit of every job, in order
        self._keys: dict[str, _Key] = {}
        self._ring: deque[str] = deque()  # keys with queued jobs, head first
        self._throughput = 0.0  # cost per second, smoothed, for Retry-After

    # --- submissions ------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job at the back of its key's queue; QueueFull over a bound."""
        state = self._keys.setdefault(job.key, _Key())
        if len(state.jobs) >= self.max_per_key:
            raise QueueFull(
                f"key {job.key!r} has {len(state.jobs)} requests queued (server setting "
                f"max_queued_per_key is {self.max_per_key})",
                self._retry_after(sum(j.cost for j in state.jobs)),
            )
        if self.depth() >= self.max_total:
            raise QueueFull(
                f"the server has {self.depth()} requests queued (server setting max_queued is "
                f"{self.max_total})",
                self._retry_after(sum(j.cost for s in self._keys.values() for j in s.jobs)),
            )
        if not state.jobs:
            # A newly active key goes right after the head, with no banked credit.
            state.deficit = 0.0
            self._ring.insert(1 if self._ring else 0, job.key)
        state.jobs.append(job)
        job.units_waited = -self.units_run  # completed when the job first runs

    def remove(self, job: Job) -> None:
        """Take a job out (cancelled, finished or failed), releasing its memory."""
        state = self._keys.get(job.key)
        if state is not None and job in state.jobs:
            state.jobs.remove(job)
            if not state.jobs:
                self._drop_key(job.key)
        if job.admitted:
            self.reserved -= job.reserve_bytes
            job.admitted = False

    def _drop_key(self, key: str) -> None:
        self._keys[key].deficit = 0.0
        self._keys[key].in_turn = False
        if key in self._ring:
            self._ring.remove(key)

    # --- choosing ---------------------------------------------------------------------------

    def next(self, ready: Callable[[Job], bool] = lambda job: True, passes: int = 4) -> Job | None:
        """The job whose next unit runs now (it stays at the front of its key's queue), or
        None when nothing can run (empty, nothing fits in memory yet, nothing ``ready``)."""
        for _ in range(passes * max(1, len(self._ring))):
            if not self._ring:
                return None
            key = self._ring[0]
            state = self._keys[key]
            job = state.jobs[0]
            if not self._fits(job) or not ready(job):
                # This key waits for memory; others may run meanwhile.
                state.in_turn = False
                self._ring.rotate(-1)
                continue
            if state.deficit < job.cost:
                if state.in_turn:  # its visit is spent: the next key's turn
                    state.in_turn = False
                    self._ring.rotate(-1)
                    continue
                # A new visit: a quantum more (capped, so an idle key banks no burst).
                quantum = self._quantum(job)
                state.deficit = min(state.deficit + quantum, 2 * quantum + job.cost)
                if state.deficit < job.cost:
                    self._ring.rotate(-1)
                    continue
            state.in_turn = True
            state.deficit -= job.cost
            if not job.admitted:
                job.admitted = True
                self.reserved += job.reserve_bytes
            if job.started is None:
                job.units_waited += self.units_run
            return job
        return None

    def _quantum(self, job: Job) -> float:
        """One visit's credit: the costliest next unit among the keys waiting (at most the
        configured quantum, the largest unit a request may bring)."""
        heads = [self._keys[key].jobs[0].cost for key in self._ring if self._keys[key].jobs]
        return min(self.quantum, max([job.cost, *heads]))

    def take_along(self, first: Job, accept: Callable[[Job], bool]) -> list[Job]:
        """More jobs to run in one batch with ``first`` (just picked by ``next``): each key's
        waiting jobs in order, keys in ring order, while ``accept`` takes them and memory
        allows. Each is charged to its key's deficit — possibly below zero, which its key then
        makes up by waiting — so riding along is no way around fairness."""
        taken: list[Job] = []
        for key in list(self._ring):
            for job in list(self._keys[key].jobs):
                if job is first:
                    continue
                if job.started is not None or not self._fits(job) or not accept(job):
                    break  # a key's jobs stay in order
                self._keys[key].deficit -= job.cost
                job.admitted = True
                self.reserved += job.reserve_bytes
                job.units_waited += self.units_run
                taken.append(job)
        return taken

    def park(self, job: Job) -> None:
        """Take a running job out of its key's queue, keeping its memory: its units run
        elsewhere now (a generation decoding in the shared pool). ``remove`` ends it."""
        state = self._keys.get(job.key)
        if state is not None and job in state.jobs:
            state.jobs.remove(job)
            if not state.jobs:
                self._drop_key(job.key)

    def reserve(self, nbytes: int) -> None:
        """Hold memory for the executor's own use (the decode pool)."""
        self.reserved += nbytes
        self.reserved_by_executor += nbytes

    def _fits(self, job: Job) -> bool:
        return job.admitted or self.reserved + job.reserve_bytes <= self.memory_budget

    def ran(self, job: Job, cost: float, seconds: float, next_cost: float | None) -> None:
        """A unit of ``job`` ran. ``next_cost`` None: the job is done (and removed)."""
        self.units_run += 1
        job.units_run += 1
        if seconds > 0:
            rate = cost / seconds
            self._throughput = rate if not self._throughput else 0.8 * self._throughput + 0.2 * rate
        state = self._keys.get(job.key)
        if next_cost is None or state is None or job not in state.jobs:  # done, or cancelled
            self.remove(job)
            return
        job.cost = next_cost  # whether the key's visit goes on, ``next`` decides

    # --- state ------------------------------------------------------------------------------

    def depth(self) -> int:
        return sum(len(state.jobs) for state in self._keys.values())

    def depth_by_key(self) -> dict[str, int]:
        return {key: len(state.jobs) for key, state in self._keys.items() if state.jobs}

    def jobs(self) -> list[Job]:
        return [job for state in self._keys.values() for job in state.jobs]

    def _retry_after(self, cost_ahead: float) -> float:
        if self._throughput <= 0:
            return 1.0
        return max(1.0, cost_ahead / self._throughput)


def drop_where(queue: FairQueue, gone: Callable[[Job], bool]) -> list[Job]:
    """Remove every queued job ``gone`` says goes (cancelled, past its deadline)."""
    dropped = [job for job in queue.jobs() if gone(job)]
    for job in dropped:
        queue.remove(job)
    return dropped
