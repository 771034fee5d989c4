"""The models a server answers for, by name. Embedded: the one model it loaded, run by the
scheduler in this process. Scaled out: every model some worker registered in Redis
(``remote/registry.py``), validated here on a weightless shell and run by the workers.

A request names its model (``model``), or leaves it to the default: the only one, or the first
one registered. Scaled out, a name with no live worker is 503 with the list of what is served —
the same answer a client gets while the model's workers restart; an embedded server, which
serves one model for its whole life, answers 404 for any other name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hooklab_proto import ErrorCode

from .auth import Account
from .execution import Executor
from .ops import CancelToken, Operations, RequestError, TensorsResult, objects
from .ops.describe import public_name
from .tensor_frames import StreamedTensors

WeightReader = Callable[
    [str, Account, bool, CancelToken], Awaitable[TensorsResult | StreamedTensors]
]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    operations: Operations  # validation (and, embedded, execution) over the model or its shell
    executor: Executor
    read_weight: WeightReader  # name, caller, wants_json, token -> the parameter
    tokenizer_files: dict[str, str]
    workers: int  # live processes running it (embedded: 1)


class ModelSet(Protocol):
    async def get(self, name: str | None) -> ModelEntry:
        """The model ``name`` names (None: the default); RequestError 503 when nobody serves
        it now."""
        ...

    async def listing(self) -> list[ModelEntry]:
        """Every model served, the default first."""
        ...

    async def problem(self) -> str | None:
        """Why the server cannot serve now (None: it can) — readiness."""
        ...

    async def aclose(self) -> None: ...


def unknown_model(name: str, served: list[str]) -> RequestError:
    return RequestError(
        ErrorCode.NOT_FOUND,
        f"no model named {name[:100]!r} is served here",
        f"served: {', '.join(served)} (GET /v1/models)",
    )


def not_served(name: str, served: list[str]) -> RequestError:
    return RequestError(
        ErrorCode.UNAVAILABLE,
        f"model {name[:100]!r} has no live worker here",
        f"served now: {', '.join(served) or 'none'} (GET /v1/models)",
        retry_after=5.0,
    )


class EmbeddedModels:
    """The one model an embedded server loaded, run by its executor in this process."""

    def __init__(
        self, operations: Operations, executor: Executor, tokenizer_files: dict[str, str]
    ) -> None:
        model_name = str(operations.ctx.model.cfg.model_name)
        name = public_name(model_name) or model_name
        self.entry = ModelEntry(name, operations, executor, self._weight, tokenizer_files, 1)
        self._aliases = {model_name, name}
        self._readiness = Readiness()

    async def _weight(
        self, name: str, caller: Account, wants_json: bool, token: CancelToken
    ) -> TensorsResult:
        ctx = self.entry.operations.ctx
        value = await asyncio.to_thread(objects.weight, ctx, name, wants_json)
        return TensorsResult({name: value}, {})

    async def get(self, name: str | None) -> ModelEntry:
        if name is None or name in self._aliases:
            return self.entry
        raise unknown_model(name, [self.entry.name])

    async def listing(self) -> list[ModelEntry]:
        return [self.entry]

    async def problem(self) -> str | None:
        return await self._readiness.probe(self.entry.operations)

    async def aclose(self) -> None:
        await self.entry.executor.aclose()


# Readiness probes come every few seconds; one forward answers them all for this long.
READY_FOR_S = 2.0
READY_TIMEOUT_S = 30.0


class Readiness:
    """The last probe of the model: when, and what went wrong (None: it answered)."""

    def __init__(self) -> None:
        self.checked_at = -READY_FOR_S
        self.problem: str | None = "not probed yet"

    async def probe(self, operations: Operations) -> str | None:
        now = time.monotonic()
        if now - self.checked_at > READY_FOR_S:
            model = operations.ctx.model
            one_token = torch.zeros(1, 1, dtype=torch.long)
            try:
                forward = asyncio.to_thread(model.forward, one_token, return_type=None)
                await asyncio.wait_for(forward, READY_TIMEOUT_S)
                self.problem = None
            except Exception as exc:  # a device error, or a model that does not answer
                self.problem = type(exc).__name__
            self.checked_at = now
        return self.problem
