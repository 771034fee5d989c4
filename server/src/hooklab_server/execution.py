"""The execution seam: routes hand validated work to an :class:`Executor` and never touch the
model themselves. Today's implementation runs each piece of work in a worker thread as it comes;
a scheduler (fair queues, batching) or a Redis-backed worker pool implements the same protocol.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, TypeVar

from fastapi.concurrency import run_in_threadpool

from hooklab_proto import GenerateResponse, GenerateStep

from .metrics import Metrics
from .ops import (
    Cancelled,
    CancelToken,
    ForwardWork,
    GenerateWork,
    Operations,
    PatchingWork,
    TensorsResult,
)


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


Result = TypeVar("Result")
# Work estimated to peak above this hands its freed memory back to the system when it ends.
TRIM_ABOVE_BYTES = 64 * 2**20


def _malloc_trim() -> Callable[[], None]:
    """glibc keeps freed heap memory for reuse (hundreds of MiB after one big forward);
    malloc_trim returns it. A no-op where the C library has none."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


release_memory = _malloc_trim()


def _then_trim(fn: Callable[..., Result], big: bool) -> Callable[..., Result]:
    def run(*args: object) -> Result:
        reason = None
        try:
            return fn(*args)
        except Cancelled as stop:
            # Raised afresh below, so the stopped work's frames — and the activations they
            # hold — are freed before the trim, not when the exception is finally dropped.
            reason = stop.reason
        finally:
            if big:
                release_memory()
        raise Cancelled(reason)

    return run


class ThreadExecutor:
    """Each request's work in its own worker thread, concurrently, straight on the model."""

    def __init__(self, operations: Operations, metrics: Metrics) -> None:
        self.operations = operations
        self.metrics = metrics

    async def run(self, work: ForwardWork | PatchingWork, token: CancelToken) -> TensorsResult:
        big = work.cost.peak_bytes > TRIM_ABOVE_BYTES
        with self.metrics.running(work.op, work.cost.peak_bytes):
            return await run_in_threadpool(_then_trim(self.operations.execute, big), work, token)

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
                if work.cost.peak_bytes > TRIM_ABOVE_BYTES:
                    await run_in_threadpool(release_memory)

    async def aclose(self) -> None:
        return None
