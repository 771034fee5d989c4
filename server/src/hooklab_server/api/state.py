"""What every route reaches through the application: one :class:`Service` per server."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from ..auth import KeyRing
from ..callbacks import CallbackSessions
from ..metrics import Metrics
from ..models import ModelEntry, ModelSet
from ..quotas import Quotas
from ..settings import Settings
from ..store import Store


@dataclass(frozen=True)
class Service:
    models: ModelSet
    store: Store
    settings: Settings
    metrics: Metrics
    keys: KeyRing
    quotas: Quotas
    callback_sessions: CallbackSessions | None = None  # None: this server takes no callbacks


def service(request: HTTPConnection) -> Service:
    found: Service = request.app.state.hooklab
    return found


async def model_entry(request: HTTPConnection, name: str | None) -> ModelEntry:
    """The served model a request names (its body's ``model``, or ``?model=``)."""
    return await service(request).models.get(name)
