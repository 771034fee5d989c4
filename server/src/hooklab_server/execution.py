"""The execution seam: routes hand validated work to an :class:`Executor` and never touch the
model themselves. The scheduler (``scheduler/``: one executor thread, fair queues) implements
it in this process; ``remote/executor.py`` hands it to worker processes through Redis.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from hooklab_proto import GenerateResponse, GenerateStep

from .ops import CancelToken, CaptureStream, GenerateWork, TensorsResult, TensorWork
from .tensor_frames import StreamedTensors


class Executor(Protocol):
    async def run(
        self, work: TensorWork, token: CancelToken, key: str
    ) -> TensorsResult | StreamedTensors | CaptureStream:
        """Run a forward, a patching sweep or integrated gradients for the key named ``key``
        to the end; raise ``Cancelled`` when the token stops it, ``RequestError`` for input
        only found wrong while running (or when it cannot be queued). A run_with_cache may
        answer while it runs: its captures so far, the rest as they come (CaptureStream), or
        a worker's frame stream (StreamedTensors)."""
        ...

    def generate(
        self, work: GenerateWork, token: CancelToken, key: str
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        """Each step of a generation as it is made, then its response."""
        ...

    async def aclose(self) -> None: ...
