"""Service routes: liveness, readiness, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .running import HooklabRoute
from .state import service

router = APIRouter(route_class=HooklabRoute, tags=["service"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (never touches the model)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, str]:
    return {"status": "ready", "model": service(request).ctx.model.cfg.model_name}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> str:
    """Prometheus text format."""
    return service(request).metrics.render()
