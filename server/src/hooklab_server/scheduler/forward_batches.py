"""Merged forwards: queued forward requests with equal merge keys share one forward (run by
``ops/batching.py``), up to ``batch_max_tokens`` padded tokens. When nothing else waits, the
executor first waits ``gather_window_ms`` for more to arrive.

Requests that ride along are charged to their keys like any unit (``FairQueue.take_along``),
so batching is no way around fairness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from ..metrics import Metrics
from ..ops import Cancelled, ForwardWork, OpsContext, RequestError
from ..ops.batching import padded_tokens, run_forward_batch
from ..settings import Settings
from .ledger import Ledger
from .policy import Job
from .runs import Outcome, Run, failure_outcome, run_of

logger = logging.getLogger("hooklab_server")


class ForwardBatcher:
    def __init__(
        self,
        ctx: OpsContext,
        ledger: Ledger,
        metrics: Metrics,
        settings: Settings,
        wake: threading.Event,  # set when work arrives: ends a gather window early
    ) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.metrics = metrics
        self.max_tokens = settings.batch_max_tokens
        self.gather_s = settings.gather_window_ms / 1000
        self.wake = wake

    def gather(self, job: Job) -> list[Job]:
        """``job`` and the queued forwards that can share its forward (within the token
        budget; when nothing else waits, after a short gather window for more to arrive)."""
        run = run_of(job)
        if run.merge_key is None or job.units_run:
            return [job]
        assert isinstance(run.work, ForwardWork)
        works = [run.work]

        def accept(other: Job) -> bool:
            candidate = run_of(other)
            if candidate.merge_key != run.merge_key or candidate.token.reason is not None:
                return False
            assert isinstance(candidate.work, ForwardWork)
            if padded_tokens([*works, candidate.work]) > self.max_tokens:
                return False
            works.append(candidate.work)
            return True

        if padded_tokens(works) >= self.max_tokens:
            return [job]
        started = time.perf_counter()
        if self.ledger.depth() == 1 and self.gather_s > 0:
            self.wake.clear()
            self.wake.wait(self.gather_s)
        taken = self.ledger.take_along(job, accept)
        run.stats["gather_s"] = time.perf_counter() - started
        self.metrics.observe("gather_seconds", run.stats["gather_s"])
        return [job, *taken]

    def run(self, batch: list[Job]) -> None:
        """One merged forward for several requests' forwards."""
        runs = [run_of(job) for job in batch]
        now = time.perf_counter()
        for job in batch:
            self.ledger.started(job, now)
        works = [run.work for run in runs if isinstance(run.work, ForwardWork)]
        assert len(works) == len(runs)
        ops = sorted({work.op for work in works})

        def on_layer() -> None:
            for op in ops:
                self.metrics.add("work_units", op=op)

        outcomes: Sequence[Outcome]
        try:
            with torch.inference_mode():
                outcomes = run_forward_batch(self.ctx, works, [run.token for run in runs], on_layer)
        except Cancelled as stop:
            outcomes = [Cancelled(stop.reason) for _ in runs]  # afresh: frees the stopped frames
        except Exception as exc:
            # One request's hooks may fail as they run (a traced graph's computed index out of
            # range): each runs again alone, so only the one at fault fails.
            if not isinstance(exc, RequestError):
                logger.exception("a merged forward of %d requests failed", len(runs))
            outcomes = [_alone(run) for run in runs]
        seconds = time.perf_counter() - now
        rows = sum(int(work.input.shape[0]) for work in works)
        self.metrics.observe("batch_requests", len(runs))
        self.metrics.observe("batch_rows", rows)
        for job, run, outcome in zip(batch, runs, outcomes, strict=True):
            run.steps.close()
            run.stats.update(co_batched=len(runs), batch_rows=rows)
            self.ledger.finish(job, outcome, seconds)


def _alone(run: Run) -> Outcome:
    """The outcome of a merged request's forward run by itself (its solo unit)."""
    try:
        next(run.steps)
    except StopIteration as finished:
        outcome: Outcome = finished.value
        return outcome
    except Exception as exc:
        return failure_outcome(exc, run.work.op, traceback=True)
    return failure_outcome(RuntimeError("a forward took more than one unit"), run.work.op)
