"""Service routes: liveness, readiness, capabilities and metrics."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from hooklab_proto import DTYPE_CODES, SPEC_OPS, Capabilities, Limits

from ..engine import HookedTransformer
from .running import HooklabRoute
from .state import service

router = APIRouter(route_class=HooklabRoute, tags=["service"])

# Readiness probes come every few seconds; one forward answers them all for this long.
READY_FOR_S = 2.0
READY_TIMEOUT_S = 30.0


class Readiness:
    """The last probe of the model: when, and what went wrong (None: it answered)."""

    def __init__(self) -> None:
        self.checked_at = -READY_FOR_S
        self.problem: str | None = "not probed yet"

    async def probe(self, model: HookedTransformer) -> str | None:
        now = time.monotonic()
        if now - self.checked_at > READY_FOR_S:
            one_token = torch.zeros(1, 1, dtype=torch.long)
            try:
                forward = run_in_threadpool(model.forward, one_token, return_type=None)
                await asyncio.wait_for(forward, READY_TIMEOUT_S)
                self.problem = None
            except Exception as exc:  # a device error, or a model that does not answer
                self.problem = type(exc).__name__
            self.checked_at = now
        return self.problem


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (never touches the model)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the model does not answer"}})
async def readyz(request: Request) -> Response:
    """Ready when a 1-token forward runs on the model's device (checked at most every 2 s)."""
    hooklab = service(request)
    problem = await hooklab.readiness.probe(hooklab.ctx.model)
    model_name = hooklab.ctx.model.cfg.model_name
    if problem is not None:
        body = {"status": "not ready", "model": model_name, "reason": problem}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "model": model_name})


@router.get("/v1/capabilities", response_model=Capabilities)
async def capabilities(request: Request) -> Capabilities:
    """What this server offers and allows: limits, default quotas, operations, spec ops,
    dtypes, and whether requests need a key."""
    hooklab = service(request)
    settings = hooklab.settings
    routes = sorted(path for path in request.app.openapi()["paths"] if path.startswith("/v1/"))
    return Capabilities(
        auth=hooklab.keys.enabled,
        model=str(hooklab.ctx.model.cfg.model_name),
        limits=Limits(**settings.limits()),
        quotas=settings.quotas(),
        ops=routes,
        spec_ops=list(SPEC_OPS),
        dtypes=sorted(DTYPE_CODES),
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
