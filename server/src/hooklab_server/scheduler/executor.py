"""One executor thread owns the model; every request's work reaches it through the fair queue.

The event loop submits validated work (``run``, ``generate``) and awaits its results; the
executor thread asks the policy which job runs next, runs one unit of it (a forward, a patching
chunk, a generation step), hands what the unit produced back to the event loop, and asks again.
Between units it drops queued work whose client left or whose deadline passed, so a light user
waits at most one unit behind a heavy one and abandoned work costs nothing more.

A unit runs alone (here), merged with other forwards (``forward_batches``), or, for a pooled
generation, as its join to the decode pool, whose steps interleave with the other units
(``decoding``). ``ledger`` keeps the books both threads share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable

import torch

from hooklab_proto import ErrorCode, GenerateResponse, GenerateStep

from ..metrics import Metrics
from ..ops import (
    CancelToken,
    CaptureStream,
    ForwardWork,
    GenerateWork,
    Operations,
    RequestError,
    TensorsResult,
    TensorWork,
    Work,
    capture_on_the_wire,
    streams_captures,
)
from ..ops.batching import merge_key
from ..settings import Settings
from .decoding import Decoder
from .forward_batches import ForwardBatcher
from .ledger import Ledger
from .policy import FairQueue, Job
from .runs import Delivery, Outcome, Run, failure_outcome, run_of, unit_costs
from .slow_lane import SlowLane, needs_client

IDLE_WAIT_S = 0.05  # how often an idle executor looks for cancelled queued work


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
        # A quantum of the largest unit a request may bring: every key runs a unit per visit.
        queue = FairQueue(
            quantum=settings.max_tokens * self.n_layers,
            max_per_key=settings.max_queued_per_key,
            max_total=settings.max_queued,
            memory_budget=self.budget,
        )
        # Generations in the decode pool have left the queue but still count as running.
        self.ledger = Ledger(queue, metrics, running_outside_queue=lambda: self.decoder.active)
        self._wake = threading.Event()  # work arrived, or a caller left
        self.decoder = Decoder(operations.ctx, self.ledger, metrics, settings)
        self.batcher = ForwardBatcher(operations.ctx, self.ledger, metrics, settings, self._wake)
        self.forward_slice_s = settings.forward_slice_ms / 1000
        self.slow_lane = SlowLane(operations, settings.max_parked_callbacks)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="hooklab-executor", daemon=True)
        self._thread.start()
        metrics.sampled(
            "queue_depth_by_key", "requests waiting or between units, by key name", "key",
            self.ledger.depth_by_key,
        )  # fmt: skip

    # --- the event loop's side --------------------------------------------------------------

    async def run(
        self, work: TensorWork, token: CancelToken, key: str
    ) -> TensorsResult | CaptureStream:
        if needs_client(work):
            self._check_budget(work)
            async with contextlib.aclosing(self.slow_lane.run(work, token)) as outcomes:
                async for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    assert isinstance(outcome, TensorsResult)
                    return outcome
            raise RuntimeError("the slow lane ended without an outcome")
        if isinstance(work, ForwardWork) and streams_captures(work):
            return await self._streamed(work, token, key)
        done: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()

        def deliver(item: Delivery) -> None:
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
        result.meta["scheduler"] = run_of(job).stats
        return result

    async def _streamed(
        self, work: ForwardWork, token: CancelToken, key: str
    ) -> TensorsResult | CaptureStream:
        """A run_with_cache whose captures go out while it runs: the stream once the first
        capture is ready (the rest follows as its outcome), or the outcome when that came
        first (a failure is then still an HTTP error)."""
        stream = work.stream = CaptureStream(
            asyncio.get_running_loop(), capture_on_the_wire(work), token,
            work.cost.response_bytes,
        )  # fmt: skip
        submitted: list[Job] = []

        def deliver(item: Delivery) -> None:
            if isinstance(item, TensorsResult):
                item.meta["scheduler"] = run_of(submitted[0]).stats
            assert isinstance(item, TensorsResult | BaseException)
            stream.finish(item)

        job = self._submit(work, token, key, deliver)
        submitted.append(job)
        try:
            first = await stream.first()
        except BaseException:
            self._forget(job, token)
            raise
        if first is None:  # a capture is ready: the response starts, the work goes on
            stream.on_close(lambda: self._forget(job, token))
            return stream
        self._forget(job, token)
        if isinstance(first, BaseException):
            raise first
        return first

    async def generate(
        self, work: GenerateWork, token: CancelToken, key: str
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        if needs_client(work):
            self._check_budget(work)
            async with contextlib.aclosing(self.slow_lane.run(work, token)) as deliveries:
                async for item in deliveries:
                    if isinstance(item, BaseException):
                        raise item
                    assert not isinstance(item, TensorsResult)
                    yield item
            return
        items: asyncio.Queue[Delivery] = asyncio.Queue()
        job = self._submit(work, token, key, items.put_nowait)
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                assert not isinstance(item, TensorsResult)  # a generation's steps, then response
                if isinstance(item, GenerateResponse):
                    stats = run_of(job).stats
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

    def _check_budget(self, work: Work) -> None:
        if work.cost.peak_bytes > self.budget:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"this request would hold about {work.cost.peak_bytes} bytes at its peak; the "
                f"device's budget is {self.budget} bytes (server setting memory_budget_bytes)"
                + _backward_part(work.cost.backward_bytes),
                "send a smaller batch, fewer positions or fewer captured hook points",
            )

    def _submit(
        self, work: Work, token: CancelToken, key: str, deliver: Callable[[Delivery], None]
    ) -> Job:
        self._check_budget(work)
        run = Run(
            work, self.operations.steps(work, token), token, asyncio.get_running_loop(),
            deliver, unit_costs(work, self.n_layers),
        )  # fmt: skip
        if isinstance(work, ForwardWork):
            run.merge_key = merge_key(self.operations.ctx, work)
        job = Job(key, run.unit_cost(0), work.cost.peak_bytes, time.monotonic(), run)
        self.ledger.submit(job)
        self._wake.set()
        return job

    def _forget(self, job: Job, token: CancelToken) -> None:
        """The caller stopped waiting (finished, failed, or gone): a queued or half-run job is
        dropped by the executor at its next look."""
        if job.payload is not None and token.reason is None and self.ledger.is_live(job):
            token.cancel("disconnect")
            self._wake.set()

    # --- the executor thread ----------------------------------------------------------------

    def _serve(self) -> None:
        """Decode steps and other units interleave: after a step, other units (joins,
        forwards, chunks) run until ``forward_slice_ms`` is used, then the next step — so a
        token stalls at most a slice plus a unit, and joins can fill the pool in a burst."""
        last_step = time.perf_counter()
        while not self._stopping:
            self.decoder.leave_cancelled()
            step_due = (
                self.decoder.active > 0 and time.perf_counter() - last_step >= self.forward_slice_s
            )
            job = None if step_due else self.ledger.next_job(self.decoder.ready)
            if job is None:
                if self.decoder.active:  # a step is due, or nothing else can run: step now
                    self.decoder.step()
                    last_step = time.perf_counter()
                else:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                continue
            if self.decoder.joins(job):
                self.decoder.join(job)
                continue
            batch = self.batcher.gather(job)
            if len(batch) > 1:
                self.batcher.run(batch)
            else:
                self._run_unit(job)

    def _run_unit(self, job: Job) -> None:
        """One unit of one job: a forward, a patching chunk, or a step of a generation that
        runs alone."""
        run = run_of(job)
        now = time.perf_counter()
        self.ledger.started(job, now)
        next_cost: float | None = None  # stays None when this unit ended the job
        outcome: Outcome  # set when it did
        try:
            item = next(run.steps)
            next_cost = run.unit_cost(job.units_run + 1)
            if item is not None:
                run.send(item)
        except StopIteration as finished:
            outcome = finished.value
        except Exception as exc:
            outcome = failure_outcome(exc, run.work.op, traceback=True)
        seconds = time.perf_counter() - now
        if next_cost is None:
            self.ledger.finish(job, outcome, seconds)
        else:
            self.ledger.ran(job, seconds, next_cost)


def _backward_part(nbytes: int) -> str:
    if not nbytes:
        return ""
    return f"; its backward pass keeps about {nbytes} bytes of activations and gradients"
