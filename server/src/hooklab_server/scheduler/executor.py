"""One executor thread owns the model; every request's work reaches it through the fair queue.

The event loop submits validated work (``run``, ``generate``) and awaits its results; the
executor thread asks the policy which job runs next, runs one unit of it (a forward, a patching
chunk, a generation step), hands what the unit produced back to the event loop, and asks again.
Between units it drops queued work whose client left or whose deadline passed, so a light user
waits at most one unit behind a heavy one and abandoned work costs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from hooklab_proto import ErrorCode, GenerateResponse, GenerateStep

from ..engine import DecodePool, RowGroup
from ..memory import TRIM_ABOVE_BYTES, release_memory
from ..metrics import Metrics
from ..ops import (
    Cancelled,
    CancelToken,
    ForwardWork,
    GenerateWork,
    Operations,
    PatchingWork,
    RequestError,
    Steps,
    TensorsResult,
    Work,
)
from ..ops.batching import merge_key, padded_tokens, run_forward_batch
from ..ops.generate import Generation
from ..settings import Settings
from .policy import FairQueue, Job, QueueFull, drop_where

logger = logging.getLogger("hooklab_server")

IDLE_WAIT_S = 0.05  # how often an idle executor looks for cancelled queued work


@dataclass(eq=False)
class _Run:
    """The executor's side of a job: its units, and where their output goes."""

    work: Work
    steps: Steps
    token: CancelToken
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[Any], None]  # called on the event loop with an item, a result or an error
    unit_tokens: list[int]  # tokens of the first unit, then of every later one
    merge_key: Hashable | None = None  # forwards with equal keys may share a batch
    queued_at: float = field(default_factory=time.perf_counter)
    run_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.deliver, item)


def memory_budget(settings: Settings, device: torch.device) -> int:
    """The bytes admitted work may hold at once: the setting, or (0) half the machine's memory
    on a CPU, 90% of what the model left free on a GPU."""
    if settings.memory_budget_bytes:
        return settings.memory_budget_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


class SchedulerExecutor:
    def __init__(self, operations: Operations, metrics: Metrics, settings: Settings) -> None:
        self.operations = operations
        self.metrics = metrics
        model = operations.ctx.model
        self.n_layers = model.cfg.n_layers
        self.budget = memory_budget(settings, model.device)
        self.batch_max_tokens = settings.batch_max_tokens
        self.gather_s = settings.gather_window_ms / 1000
        # A quantum of the largest unit a request may bring: every key runs a unit per visit.
        self.queue = FairQueue(
            quantum=settings.max_tokens * self.n_layers,
            max_per_key=settings.max_queued_per_key,
            max_total=settings.max_queued,
            memory_budget=self.budget,
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._live: set[Job] = set()  # submitted, not yet finished
        # Continuous batching: generations decode together in one pool (made when first needed).
        self.pool: DecodePool | None = None
        self.decode_rows = settings.decode_rows
        self.decode_positions = min(settings.decode_positions, model.cfg.n_ctx)
        self.decoding: dict[RowGroup, _Decoding] = {}
        self.forward_slice_s = settings.forward_slice_ms / 1000
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="hooklab-executor", daemon=True)
        self._thread.start()
        metrics.sampled(
            "queue_depth_by_key", "requests waiting or between units, by key name", "key",
            self._depth_by_key,
        )  # fmt: skip

    # --- the event loop's side --------------------------------------------------------------

    async def run(
        self, work: ForwardWork | PatchingWork, token: CancelToken, key: str
    ) -> TensorsResult:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def deliver(item: Any) -> None:
            if done.done():
                return  # the caller is gone
            if isinstance(item, BaseException):
                done.set_exception(item)
            else:
                done.set_result(item)

        job = self._submit(work, token, key, deliver)
        try:
            result = await done
        finally:
            self._forget(job, token)
        assert isinstance(result, TensorsResult)
        result.meta["scheduler"] = job.payload.stats
        return result

    async def generate(
        self, work: GenerateWork, token: CancelToken, key: str
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        items: asyncio.Queue[Any] = asyncio.Queue()
        job = self._submit(work, token, key, items.put_nowait)
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerateResponse):
                    stats = job.payload.stats
                    item.stats.queued_s = stats["queued_s"]
                    item.stats.units_waited = int(stats["units_waited"])
                    yield item
                    return
                yield item
        finally:
            self._forget(job, token)

    async def aclose(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)

    def _submit(
        self, work: Work, token: CancelToken, key: str, deliver: Callable[[Any], None]
    ) -> Job:
        if work.cost.peak_bytes > self.budget:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"this request would hold about {work.cost.peak_bytes} bytes at its peak; the "
                f"device's budget is {self.budget} bytes (server setting memory_budget_bytes)",
                "send a smaller batch, fewer positions or fewer captured hook points",
            )
        run = _Run(
            work, self.operations.steps(work, token), token, asyncio.get_running_loop(),
            deliver, _unit_tokens(work),
        )  # fmt: skip
        if isinstance(work, ForwardWork):
            run.merge_key = merge_key(self.operations.ctx, work)
        job = Job(key, self._cost(run, 0), work.cost.peak_bytes, time.monotonic(), run)
        with self._lock:
            self._live.add(job)
            try:
                self.queue.submit(job)
            except QueueFull as full:
                self._live.discard(job)
                raise RequestError(
                    ErrorCode.QUEUE_FULL, full.message, "retry later", full.retry_after
                ) from None
        self.metrics.add("inflight_requests", 1, op=work.op)
        self._publish()
        self._wake.set()
        return job

    def _forget(self, job: Job, token: CancelToken) -> None:
        """The caller stopped waiting (finished, failed, or gone): a queued or half-run job is
        dropped by the executor at its next look."""
        if job.payload is not None and token.reason is None and not self._finished(job):
            token.cancel("disconnect")
            self._wake.set()

    def _finished(self, job: Job) -> bool:
        with self._lock:
            return job not in self._live

    def _publish(self) -> None:
        """The queue's state as gauges."""
        with self._lock:
            jobs = self.queue.jobs()
            reserved = self.queue.reserved - self.queue.reserved_by_executor
        self.metrics.set("queue_depth", sum(job.started is None for job in jobs))
        running = sum(job.started is not None for job in jobs) + len(self.decoding)
        self.metrics.set("running_jobs", running)
        self.metrics.set("inflight_bytes", reserved)

    def _depth_by_key(self) -> dict[str, float]:
        with self._lock:
            return {key: float(n) for key, n in self.queue.depth_by_key().items()}

    def _cost(self, run: _Run, unit: int) -> float:
        tokens = run.unit_tokens[min(unit, len(run.unit_tokens) - 1)]
        return float(tokens * self.n_layers)

    # --- the executor thread ----------------------------------------------------------------

    def _serve(self) -> None:
        """Decode steps and other units interleave: after a step, other units (joins,
        forwards, chunks) run until ``forward_slice_ms`` is used, then the next step — so a
        token stalls at most a slice plus a unit, and joins can fill the pool in a burst."""
        last_step = time.perf_counter()
        while not self._stopping:
            self._leave_cancelled()
            if self.decoding and time.perf_counter() - last_step >= self.forward_slice_s:
                self._decode_step()
                last_step = time.perf_counter()
                continue
            with self._lock:
                gone = drop_where(self.queue, lambda j: j.payload.token.reason is not None)
                job = self.queue.next(self._ready)
            for stopped in gone:
                self._stop(stopped)
            if job is None:
                if self.decoding:  # nothing else to do: step now
                    self._decode_step()
                    last_step = time.perf_counter()
                else:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                continue
            if self._pooled(job.payload) and job.started is None:
                self._join(job)
                continue
            batch = self._batch_for(job)
            if len(batch) > 1:
                self._run_batch(batch)
            else:
                self._run_unit(job)

    # --- continuous batching: generations in the decode pool --------------------------------

    def _pooled(self, run: _Run) -> bool:
        """Whether a generation decodes in the shared pool (else it runs alone, step by step):
        it uses a KV cache and fits a pool's rows and positions."""
        work = run.work
        if not isinstance(work, GenerateWork) or not work.request.use_past_kv_cache:
            return False
        prompt = work.prompt
        total = prompt.pos + work.stopping.max_new_tokens
        return prompt.batch <= self.decode_rows and total <= self.decode_positions

    def _ready(self, job: Job) -> bool:
        """A pooled generation waits for free rows; everything else is ready."""
        run: _Run = job.payload
        if job.started is not None or not self._pooled(run) or self.pool is None:
            return True
        assert isinstance(run.work, GenerateWork)
        return run.work.prompt.batch <= self.pool.free_rows

    def _join(self, job: Job) -> None:
        """Prefill a generation into the pool (its first unit): it decodes with the others
        from the next step on."""
        run: _Run = job.payload
        work = run.work
        assert isinstance(work, GenerateWork)
        now = time.perf_counter()
        self._started(job, now)
        run.steps.close()  # it runs here, not through its own steps
        if self.pool is None:
            self.pool = DecodePool(
                self.operations.ctx.model, self.decode_rows, self.decode_positions
            )
            pool_bytes = self.pool.kv.numel() * self.pool.kv.element_size()
            with self._lock:
                self.queue.reserve(pool_bytes)
            self.metrics.set("decode_pool_bytes", pool_bytes)
        generation: Generation | None = None
        try:
            generation = Generation(self.operations.ctx, work, run.token)
            with torch.inference_mode():
                group, logits = self.pool.join(
                    work.prompt.tokens, work.prompt.mask, work.hooks, run.token.check
                )
                try:
                    run.send(generation.take(logits))
                except BaseException:
                    self.pool.leave(group)
                    raise
        except BaseException as exc:
            self._finish(job, run, _outcome_of(exc, run), time.perf_counter() - now)
            return
        run.run_s += time.perf_counter() - now
        self.metrics.observe("join_seconds", time.perf_counter() - now)
        with self._lock:
            self.queue.park(job)
        if generation.done:
            self.pool.leave(group)
            self._finish(job, run, self._response(generation, run), 0.0)
            return
        self.decoding[group] = _Decoding(job, run, generation)
        self._publish()

    def _decode_step(self) -> None:
        """One token for every generation in the pool, in one forward."""
        assert self.pool is not None
        now = time.perf_counter()
        tokens = {group: d.generation.last_tokens for group, d in self.decoding.items()}
        try:
            with torch.inference_mode():
                logits = self.pool.step(tokens)
        except Exception as exc:
            logger.exception("a decode step of %d generations failed", len(self.decoding))
            for group in list(self.decoding):
                self._end_decoding(group, exc, now)
            return
        seconds = time.perf_counter() - now
        self.metrics.observe("decode_rows", self.pool.active_rows)
        self.metrics.observe("decode_step_seconds", seconds)
        for group, d in list(self.decoding.items()):
            d.run.run_s += seconds
            try:
                with torch.inference_mode():
                    d.run.send(d.generation.take(logits[group]))
            except Exception as exc:
                self._end_decoding(group, exc, now)
                continue
            if d.generation.done:
                self._end_decoding(group, None, now)

    def _leave_cancelled(self) -> None:
        for group, d in list(self.decoding.items()):
            reason = d.run.token.reason
            if reason is not None:
                self._end_decoding(group, Cancelled(reason), time.perf_counter())

    def _end_decoding(self, group: RowGroup, failure: BaseException | None, since: float) -> None:
        assert self.pool is not None
        d = self.decoding.pop(group)
        self.pool.leave(group)
        if failure is None:
            outcome: Any = self._response(d.generation, d.run)
        else:
            outcome = _outcome_of(failure, d.run)
        self._finish(d.job, d.run, outcome, 0.0)

    @staticmethod
    def _response(generation: Generation, run: _Run) -> GenerateResponse:
        return generation.response()

    def _batch_for(self, job: Job) -> list[Job]:
        """``job`` and the queued forwards that can share its forward (within the token budget;
        when nothing else waits, after a short gather window for more to arrive)."""
        run: _Run = job.payload
        if run.merge_key is None or job.units_run:
            return [job]
        assert isinstance(run.work, ForwardWork)
        batch = [job]
        works = [run.work]

        def accept(other: Job) -> bool:
            candidate: _Run = other.payload
            if candidate.merge_key != run.merge_key or candidate.token.reason is not None:
                return False
            assert isinstance(candidate.work, ForwardWork)
            if padded_tokens([*works, candidate.work]) > self.batch_max_tokens:
                return False
            works.append(candidate.work)
            batch.append(other)
            return True

        if padded_tokens(works) >= self.batch_max_tokens:
            return batch
        started = time.perf_counter()
        with self._lock:
            alone = self.queue.depth() == 1
        if alone and self.gather_s > 0:
            self._wake.clear()
            self._wake.wait(self.gather_s)
        with self._lock:
            self.queue.take_along(job, accept)
        run.stats["gather_s"] = time.perf_counter() - started
        self.metrics.observe("gather_seconds", run.stats["gather_s"])
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        """One merged forward for several requests' forwards."""
        runs: list[_Run] = [job.payload for job in batch]
        now = time.perf_counter()
        for job in batch:
            self._started(job, now)
        works = [run.work for run in runs if isinstance(run.work, ForwardWork)]
        assert len(works) == len(runs)
        ops = sorted({work.op for work in works})

        def on_layer() -> None:
            for op in ops:
                self.metrics.add("work_units", op=op)

        try:
            with torch.inference_mode():
                outcomes: list[Any] = run_forward_batch(
                    self.operations.ctx,
                    works,
                    [run.token for run in runs],
                    on_layer,
                )
        except Cancelled as stop:
            outcomes = [Cancelled(stop.reason) for _ in runs]
        except Exception as exc:
            logger.exception("a merged forward of %d requests failed", len(runs))
            outcomes = [exc for _ in runs]
        seconds = time.perf_counter() - now
        rows = sum(int(work.input.shape[0]) for work in works)
        self.metrics.observe("batch_requests", len(runs))
        self.metrics.observe("batch_rows", rows)
        for job, run, outcome in zip(batch, runs, outcomes, strict=True):
            run.steps.close()
            run.stats.update(co_batched=len(runs), batch_rows=rows)
            self._finish(job, run, outcome, seconds)

    def _started(self, job: Job, now: float) -> None:
        run: _Run = job.payload
        if job.started is None:
            job.started = now
            run.stats["queued_s"] = now - run.queued_at
            run.stats["units_waited"] = job.units_waited
            self.metrics.observe("queue_seconds", now - run.queued_at, op=run.work.op)
            self._publish()

    def _finish(self, job: Job, run: _Run, outcome: Any, seconds: float) -> None:
        """A job ended (a result, a failure, or stopped): counted here, before its caller
        hears of it, so the metrics never lag the answer."""
        run.run_s += seconds
        with self._lock:
            self.queue.ran(job, job.cost, seconds, None)
            self._live.discard(job)
        generating = isinstance(run.work, GenerateWork)
        if isinstance(outcome, Cancelled):
            self.metrics.add("cancelled", op=run.work.op, reason=outcome.reason)
            if generating:
                self.metrics.add("generations_cancelled")
        elif isinstance(outcome, BaseException) and generating:
            self.metrics.add("generations_failed")
        self._publish()
        self.metrics.add("inflight_requests", -1, op=run.work.op)
        run.stats["run_s"] = run.run_s
        run.stats["units"] = job.units_run
        self.metrics.observe("run_seconds", run.run_s, op=run.work.op)
        run.send(outcome)
        self._trim(run)

    def _stop(self, job: Job) -> None:
        """A queued (or between-units) job whose client left or whose deadline passed."""
        run: _Run = job.payload
        self._live.discard(job)
        reason = run.token.reason or "disconnect"
        self.metrics.add("cancelled", op=run.work.op, reason=reason)
        if isinstance(run.work, GenerateWork) and job.started is not None:
            self.metrics.add("generations_cancelled")
        self.metrics.add("inflight_requests", -1, op=run.work.op)
        self._publish()
        run.steps.close()
        run.send(Cancelled(reason))
        self._trim(run)

    def _run_unit(self, job: Job) -> None:
        run: _Run = job.payload
        now = time.perf_counter()
        self._started(job, now)
        next_cost: float | None = None
        outcome: Any = None
        try:
            item = next(run.steps)
            next_cost = self._cost(run, job.units_run + 1)
            if item is not None:
                run.send(item)
        except StopIteration as finished:
            outcome = finished.value
        except Cancelled as stop:
            outcome = Cancelled(stop.reason)  # afresh: the stopped frames are freed now
        except (RequestError, Exception) as exc:
            if not isinstance(exc, RequestError):
                logger.exception("%s failed on the executor", run.work.op)
            outcome = exc
        seconds = time.perf_counter() - now
        if next_cost is None:
            self._finish(job, run, outcome, seconds)
            return
        run.run_s += seconds
        with self._lock:
            self.queue.ran(job, job.cost, seconds, next_cost)
        self._publish()

    @staticmethod
    def _trim(run: _Run) -> None:
        if run.work.cost.peak_bytes > TRIM_ABOVE_BYTES:
            release_memory()


@dataclass(eq=False)
class _Decoding:
    job: Job
    run: _Run
    generation: Generation


def _outcome_of(exc: BaseException, run: _Run) -> BaseException:
    """What to hand back for a failed unit: a fresh Cancelled (the stopped frames go now)."""
    if isinstance(exc, Cancelled):
        return Cancelled(exc.reason)
    if not isinstance(exc, RequestError):
        logger.error("%s failed on the executor: %r", run.work.op, exc)
    return exc


def _unit_tokens(work: Work) -> list[int]:
    """Tokens of each unit: one forward; a sweep's forwards alike; a generation's prefill,
    then one token per row per step."""
    if isinstance(work, GenerateWork):
        return [work.prompt.batch * work.prompt.pos, work.prompt.batch]
    if isinstance(work, PatchingWork):
        return [max(1, work.cost.tokens // max(1, work.cost.forwards))]
    return [work.cost.tokens]
