"""The slow lane: work that pauses for client callbacks runs on a thread of its own.

A forward waiting on a client's hook function must not hold the executor thread every other
request needs, nor join a merged batch; it runs here instead, never merged, with at most
``max_parked_callbacks`` such forwards (each holding a thread and its activations) at once.
Its memory was admitted like any other work's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from hooklab_proto import GenerateStep

from ..ops import CancelToken, Operations, Work
from ..ops.callbacks import ClientCallback
from ..ops.cancel import running_token
from .runs import Delivery, failure_outcome

_DONE = object()


def needs_client(work: Work) -> bool:
    backward = getattr(work, "backward", None)
    hooks = [*getattr(work, "hooks", ()), *(backward.hooks if backward is not None else ())]
    return any(isinstance(fn, ClientCallback) for _, fn in hooks)


class SlowLane:
    def __init__(self, operations: Operations, parked: int) -> None:
        self.operations = operations
        self.slots = asyncio.Semaphore(parked)

    async def run(self, work: Work, token: CancelToken) -> AsyncGenerator[Delivery, None]:
        """The work's deliveries (a generation's steps, then its outcome) as it runs."""
        async with self.slots:
            loop = asyncio.get_running_loop()
            items: asyncio.Queue[object] = asyncio.Queue()
            thread = threading.Thread(
                target=self._drive, args=(work, token, loop, items), name="hooklab-slow-lane",
                daemon=True,
            )  # fmt: skip
            thread.start()
            ended = False
            try:
                while (item := await items.get()) is not _DONE:
                    ended = not isinstance(item, GenerateStep)  # the outcome comes last
                    yield item  # type: ignore[misc]
            finally:
                if not ended:  # the caller left first: stop at the next hook or layer
                    token.cancel("disconnect")

    def _drive(
        self, work: Work, token: CancelToken, loop: asyncio.AbstractEventLoop,
        items: asyncio.Queue[object],
    ) -> None:  # fmt: skip
        running_token.value = token
        steps = self.operations.steps(work, token)
        try:
            while True:
                try:
                    item = next(steps)
                except StopIteration as done:
                    loop.call_soon_threadsafe(items.put_nowait, done.value)
                    return
                except Exception as exc:
                    loop.call_soon_threadsafe(items.put_nowait, failure_outcome(exc, work.op, True))
                    return
                if item is not None:
                    loop.call_soon_threadsafe(items.put_nowait, item)
        finally:
            running_token.value = None
            loop.call_soon_threadsafe(items.put_nowait, _DONE)
