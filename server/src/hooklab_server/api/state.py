"""What every route reaches through the application: one :class:`Service` per server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from ..auth import KeyRing
from ..execution import Executor
from ..metrics import Metrics
from ..ops import Operations, OpsContext
from ..quotas import Quotas
from ..settings import Settings

if TYPE_CHECKING:
    from .service import Readiness


@dataclass(frozen=True)
class Service:
    operations: Operations
    executor: Executor
    keys: KeyRing
    quotas: Quotas
    readiness: Readiness
    tokenizer_files: dict[str, str]

    @property
    def ctx(self) -> OpsContext:
        return self.operations.ctx

    @property
    def settings(self) -> Settings:
        return self.operations.ctx.settings

    @property
    def metrics(self) -> Metrics:
        return self.operations.ctx.metrics


def service(request: HTTPConnection) -> Service:
    found: Service = request.app.state.hooklab
    return found
