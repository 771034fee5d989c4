"""Captures handed to the response while the forward still runs.

A ``run_with_cache`` that returns its cache as frames need not wait for the last block: each
block's captures are final once the block has run (a hook point fires again only inside its own
block — ln1 once per attention input), so the executor thread hands them over at the next block
boundary and the response sends them while the model computes the rest. What is left (the last
block's captures, the outputs, the fields known only at the end such as a stored cache's id)
follows as the work's outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping

import torch

from .cancel import CancelToken
from .run import ForwardWork, TensorsResult

Outcome = TensorsResult | BaseException
# A capture as it goes on the wire: one named tensor, or two (the sparse top-k form).
Prepare = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def streams_captures(work: object) -> bool:
    """Whether ``work``'s captures can go out while it runs: a run_with_cache returning its
    cache as frames, with no backward pass (whose gradients exist only at the end)."""
    if not isinstance(work, ForwardWork) or work.wants_json or work.backward is not None:
        return False
    caching = work.caching
    return caching is not None and caching.return_cache and not caching.lazy


class CaptureStream:
    """Named tensors from the executor thread to the event loop, in order, then an outcome.

    ``send_new`` and ``was_sent`` belong to the executor thread (which runs the work);
    everything else to the event loop that made the stream.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        prepare: Prepare,
        token: CancelToken,
        expected_bytes: int,
    ) -> None:
        self._loop = loop
        self.token = token  # the work's: a failure's error names its deadline
        self.expected_bytes = expected_bytes  # the response's estimated size
        self._prepare = prepare  # a capture as it goes on the wire (batch axis, top-k, dtype)
        self._sent: set[str] = set()
        self._items: deque[tuple[str, torch.Tensor] | Outcome] = deque()
        self._arrived = asyncio.Event()
        self._on_close: list[Callable[[], None]] = []
        self.outcome: Outcome | None = None
        self.forward_end_at: float | None = None  # wall clock, for the response's stats

    # --- the executor thread ----------------------------------------------------------------

    def send_new(self, cache: Mapping[str, torch.Tensor]) -> None:
        """Hand over the captures in ``cache`` not sent before."""
        for name, value in list(cache.items()):
            if name not in self._sent:
                self._sent.add(name)
                for piece in self._prepare(name, value):
                    self._loop.call_soon_threadsafe(self._push, piece)

    def was_sent(self, name: str) -> bool:
        return name in self._sent

    def forward_ended(self) -> None:
        self.forward_end_at = time.time()

    # --- the event loop ---------------------------------------------------------------------

    def finish(self, outcome: Outcome) -> None:
        """The work's outcome (after every capture it handed over: both come through the
        loop's queue of callbacks, in order)."""
        self._push(outcome)

    def _push(self, item: tuple[str, torch.Tensor] | Outcome) -> None:
        self._items.append(item)
        self._arrived.set()

    async def first(self) -> Outcome | None:
        """Wait for the first item: the outcome when it came before any capture, else None."""
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        head = self._items[0]
        return None if isinstance(head, tuple) else head

    async def captures(self) -> AsyncIterator[tuple[str, torch.Tensor]]:
        """The captures as they arrive; ``outcome`` is set once this ends."""
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            item = self._items.popleft()
            if not isinstance(item, tuple):
                self.outcome = item
                return
            yield item

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        """The response ended (sent, failed, or its client left): whoever waits is told once."""
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()
