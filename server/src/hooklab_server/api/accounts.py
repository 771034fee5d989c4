"""``GET /v1/usage``: a key's own usage and quotas; an admin also sees every key's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import KeyUsage, UsageResponse

from ..auth import Account
from .edge import account_of
from .routes import ERRORS
from .running import HooklabRoute
from .state import Service, service

router = APIRouter(route_class=HooklabRoute, responses=ERRORS, tags=["service"])


def _usage(hooklab: Service, account: Account) -> KeyUsage:
    stored = hooklab.store.bytes_by_owner().get(account.name, 0)
    return KeyUsage(
        key=account.name,
        admin=account.admin,
        usage={**hooklab.quotas.usage(account), "stored_bytes": stored},
        limits=dict(account.quotas),
    )


@router.get("/v1/usage", response_model=UsageResponse, response_model_exclude_none=True)
async def usage(request: Request) -> UsageResponse:
    hooklab, account = service(request), account_of(request.scope)

    def usage_of_all() -> UsageResponse:  # off the event loop: the counts may live in Redis
        own = _usage(hooklab, account)
        keys = None
        if account.admin and hooklab.keys.enabled:
            keys = [_usage(hooklab, other) for other in hooklab.keys.accounts()]
        return UsageResponse(**own.model_dump(), keys=keys)

    return await run_in_threadpool(usage_of_all)
