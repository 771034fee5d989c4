"""Continuous batching: generations decode together in the engine's DecodePool, one forward for
one token of each per step.

A generation that uses a KV cache and fits the pool's rows and positions is pooled. Its first
unit, picked from the fair queue like any other once the pool has rows for it, is its join: its
own prefill into the pool. It then leaves the queue (keeping its memory reservation) and gets a
token at every decode step until it is done, fails, or its client goes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..engine import DecodePool, RowGroup
from ..metrics import Metrics
from ..ops import Cancelled, GenerateWork, OpsContext
from ..ops.generate import Generation
from ..settings import Settings
from .ledger import Ledger
from .policy import Job
from .runs import Run, failure_outcome, run_of

logger = logging.getLogger("hooklab_server")


@dataclass(eq=False)
class _Decoding:
    """A generation in the pool."""

    job: Job
    generation: Generation

    @property
    def run(self) -> Run:
        return run_of(self.job)


class Decoder:
    """The pooled generations of the executor thread (not thread-safe: only it calls)."""

    def __init__(
        self, ctx: OpsContext, ledger: Ledger, metrics: Metrics, settings: Settings
    ) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.metrics = metrics
        self.rows = settings.decode_rows
        self.positions = min(settings.decode_positions, ctx.model.cfg.n_ctx)
        self.pool: DecodePool | None = None  # made at the first join
        self._decoding: dict[RowGroup, _Decoding] = {}

    @property
    def active(self) -> int:
        """How many generations are decoding."""
        return len(self._decoding)

    def pooled(self, run: Run) -> bool:
        """Whether a generation decodes in the pool (else it runs alone, step by step): it uses
        a KV cache and fits a pool's rows and positions."""
        work = run.work
        if not isinstance(work, GenerateWork) or not work.request.use_past_kv_cache:
            return False
        if work.model is not None:  # uploaded SAEs: it runs alone, on its own model view
            return False
        prompt = work.prompt
        total = prompt.pos + work.stopping.max_new_tokens
        switch = self.ctx.model.cfg.longrope_original_ctx_len
        if switch is not None and prompt.pos <= switch < total:
            # longrope re-rotates every cached key when a row crosses its original context;
            # the solo path recomputes its cache then, the pool (keys written once) cannot.
            return False
        return prompt.batch <= self.rows and total <= self.positions

    def ready(self, job: Job) -> bool:
        """A pooled generation waits in the queue for free rows; everything else is ready."""
        run = run_of(job)
        if job.started is not None or not self.pooled(run) or self.pool is None:
            return True
        assert isinstance(run.work, GenerateWork)
        return run.work.prompt.batch <= self.pool.free_rows

    def joins(self, job: Job) -> bool:
        """Whether the job's next unit is a join: a pooled generation that has not started."""
        return self.pooled(run_of(job)) and job.started is None

    def join(self, job: Job) -> None:
        """Prefill a generation into the pool (its first unit): it decodes with the others
        from the next step on."""
        run = run_of(job)
        work = run.work
        assert isinstance(work, GenerateWork)
        now = time.perf_counter()
        self.ledger.started(job, now)
        run.steps.close()  # it runs here, not through its own steps
        pool = self._pool()
        try:
            generation = Generation(self.ctx, work, run.token)
            with torch.inference_mode():
                group, logits = pool.join(
                    work.prompt.tokens, work.prompt.mask, work.hooks, run.token.check
                )
                try:
                    run.send(generation.take(logits))
                except BaseException:
                    pool.leave(group)
                    raise
        except BaseException as exc:
            self.ledger.finish(job, failure_outcome(exc, work.op), time.perf_counter() - now)
            return
        seconds = time.perf_counter() - now
        run.run_s += seconds
        self.metrics.observe("join_seconds", seconds)
        self.ledger.park(job)
        if generation.done:
            pool.leave(group)
            self.ledger.finish(job, generation.response(), 0.0)
            return
        self._decoding[group] = _Decoding(job, generation)
        self.ledger.publish()

    def step(self) -> None:
        """One token for every generation in the pool, in one forward."""
        assert self.pool is not None
        now = time.perf_counter()
        tokens = {group: d.generation.last_tokens for group, d in self._decoding.items()}
        try:
            with torch.inference_mode():
                logits = self.pool.step(tokens)
        except Exception as exc:
            logger.exception("a decode step of %d generations failed", len(self._decoding))
            for group in list(self._decoding):
                self._leave(group, exc)
            return
        seconds = time.perf_counter() - now
        self.metrics.observe("decode_rows", self.pool.active_rows)
        self.metrics.observe("decode_step_seconds", seconds)
        for group, d in list(self._decoding.items()):
            d.run.run_s += seconds
            try:
                with torch.inference_mode():
                    d.run.send(d.generation.take(logits[group]))
            except Exception as exc:
                self._leave(group, exc)
                continue
            if d.generation.done:
                self._leave(group, None)

    def leave_cancelled(self) -> None:
        """Generations whose client left or whose deadline passed leave the pool."""
        for group, d in list(self._decoding.items()):
            reason = d.run.token.reason
            if reason is not None:
                self._leave(group, Cancelled(reason))

    def _leave(self, group: RowGroup, failure: BaseException | None) -> None:
        """A generation leaves the pool: done (``failure`` None), failed, or stopped."""
        assert self.pool is not None
        d = self._decoding.pop(group)
        self.pool.leave(group)
        if failure is None:
            self.ledger.finish(d.job, d.generation.response(), 0.0)
        else:
            self.ledger.finish(d.job, failure_outcome(failure, d.run.work.op), 0.0)

    def _pool(self) -> DecodePool:
        """The pool, made at the first join; its KV memory is held from the budget from then."""
        if self.pool is None:
            self.pool = DecodePool(self.ctx.model, self.rows, self.positions)
            pool_bytes = self.pool.kv.numel() * self.pool.kv.element_size()
            self.ledger.reserve(pool_bytes)
            self.metrics.set("decode_pool_bytes", pool_bytes)
        return self.pool
