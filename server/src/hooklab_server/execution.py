"""The execution seam: routes hand validated work to an :class:`Executor` and never touch the
model themselves. Today's implementation runs each piece of work in a worker thread as it comes;
a scheduler (fair queues, batching) or a Redis-backed worker pool implements the same protocol.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from fastapi.concurrency import run_in_threadpool

from hooklab_proto import GenerateResponse, GenerateStep

from .metrics import Metrics
from .ops import CancelToken, ForwardWork, GenerateWork, Operations, PatchingWork, TensorsResult


class Executor(Protocol):
    async def run(self, work: ForwardWork | PatchingWork, token: CancelToken) -> TensorsResult:
        """Run a forward or a patching sweep to the end; raise ``Cancelled`` when the token
        stops it, ``RequestError`` for input only found wrong while running."""
        ...

    def generate(
        self, work: GenerateWork, token: CancelToken
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        """Each step of a generation as it is made, then its response."""
        ...

    async def aclose(self) -> None: ...


class ThreadExecutor:
    """Each request's work in its own worker thread, concurrently, straight on the model."""

    def __init__(self, operations: Operations, metrics: Metrics) -> None:
        self.operations = operations
        self.metrics = metrics

    async def run(self, work: ForwardWork | PatchingWork, token: CancelToken) -> TensorsResult:
        with self.metrics.running(work.op, work.cost.peak_bytes):
            return await run_in_threadpool(self.operations.execute, work, token)

    async def generate(
        self, work: GenerateWork, token: CancelToken
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        with self.metrics.running(work.op, work.cost.peak_bytes):
            generation = await run_in_threadpool(self.operations.start_generation, work, token)
            steps = iter(generation)
            try:
                while (step := await run_in_threadpool(next, steps, None)) is not None:
                    yield step
                yield await run_in_threadpool(generation.response)
            finally:
                generation.close()

    async def aclose(self) -> None:
        return None
