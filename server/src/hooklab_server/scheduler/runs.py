"""The executor's record of one job (its ``Job.payload``): the work, its units and what they
cost, and where their output goes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from hooklab_proto import GenerateResponse, GenerateStep

from ..ops import (
    Cancelled,
    CancelToken,
    GenerateWork,
    IntegratedGradientsWork,
    PatchingWork,
    RequestError,
    Steps,
    TensorsResult,
    Work,
)
from .policy import Job

logger = logging.getLogger("hooklab_server")

Outcome = TensorsResult | GenerateResponse | BaseException  # how a job ends (Cancelled included)
Delivery = GenerateStep | Outcome  # what its caller receives: a generation's steps, then that


@dataclass(eq=False)
class Run:
    """The executor's side of a job: its units, and where their output goes."""

    work: Work
    steps: Steps
    token: CancelToken
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[Delivery], None]  # called on the event loop
    unit_costs: list[float]  # of the first unit, then of every later one (see ``unit_costs``)
    merge_key: Hashable | None = None  # forwards with equal keys may share a batch
    queued_at: float = field(default_factory=time.perf_counter)
    run_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)  # the response's scheduler stats

    def send(self, item: Delivery) -> None:
        """Hand ``item`` to the caller (from the executor thread)."""
        self.loop.call_soon_threadsafe(self.deliver, item)

    def unit_cost(self, unit: int) -> float:
        return self.unit_costs[min(unit, len(self.unit_costs) - 1)]


def run_of(job: Job) -> Run:
    run: Run = job.payload
    return run


def unit_costs(work: Work, n_layers: int) -> list[float]:
    """The fair queue's cost of each unit, tokens x layers: one forward (three with a backward
    pass); a sweep's forwards alike; a generation's prefill, then one token per row per step."""
    if isinstance(work, GenerateWork):
        tokens = [work.prompt.batch * work.prompt.pos, work.prompt.batch]
    elif isinstance(work, PatchingWork | IntegratedGradientsWork):
        tokens = [max(1, work.cost.tokens // max(1, work.cost.forwards))]
    else:  # a forward, and its backward pass (about two forwards' work) when it has one
        backward = getattr(work, "backward", None)
        tokens = [max(1, work.cost.tokens) * (1 if backward is None else 3)]
    return [float(count * n_layers) for count in tokens]


def failure_outcome(exc: BaseException, op: str, traceback: bool = False) -> BaseException:
    """What a job that failed hands its caller: a Cancelled afresh (the stopped frames are freed
    now), a RequestError as it is; anything else is a bug and is logged — with its traceback
    when ``traceback`` (then call this from the ``except`` block)."""
    if isinstance(exc, Cancelled):
        return Cancelled(exc.reason)
    if not isinstance(exc, RequestError):
        if traceback:
            logger.exception("%s failed on the executor", op)
        else:
            logger.error("%s failed on the executor: %r", op, exc)
    return exc
