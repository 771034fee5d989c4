"""Service routes: liveness, readiness, capabilities and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from hooklab_proto import (
    DTYPE_CODES,
    GRAPH_VERSION,
    OPS,
    OPSET,
    SPEC_OPS,
    Capabilities,
    Health,
    Limits,
    Readiness,
)

from .openapi import error_responses, schema_of
from .running import HooklabRoute
from .state import service

# Open routes: refused only for a Host the server does not answer to, or by a server bug.
router = APIRouter(route_class=HooklabRoute, tags=["service"], responses=error_responses(400, 500))


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers (never touches the model)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    responses={
        200: {"description": "ready", "content": {"application/json": schema_of(Readiness)}},
        503: {
            "description": "not ready: the model does not answer, or (scaled out) Redis or "
            "every worker is down",
            "content": {"application/json": schema_of(Readiness)},
        },
    },
)
async def readyz(request: Request) -> Response:
    """Embedded: ready when a 1-token forward runs on the model's device (checked at most
    every 2 s). Scaled out: when Redis answers and some model has a live worker."""
    models = service(request).models
    problem = await models.problem()
    served = [entry.name for entry in await models.listing()] if problem is None else []
    model_name = served[0] if served else None
    if problem is not None:
        body = Readiness(status="not ready", model=model_name, reason=problem)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    ready = Readiness(status="ready", model=model_name, models=served)
    return JSONResponse(ready.model_dump(exclude_none=True))


@router.get("/v1/capabilities", response_model=Capabilities)
async def capabilities(request: Request) -> Capabilities:
    """What this server offers and allows: limits, default quotas, operations, spec ops,
    dtypes, and whether requests need a key."""
    hooklab = service(request)
    settings = hooklab.settings
    served = await hooklab.models.listing()
    routes = sorted(path for path in request.app.openapi()["paths"] if path.startswith("/v1/"))
    return Capabilities(
        auth=hooklab.keys.enabled,
        model=served[0].name if served else "",
        limits=Limits(**settings.limits()),
        quotas=settings.quotas(),
        ops=routes,
        spec_ops=list(SPEC_OPS),
        dtypes=sorted(DTYPE_CODES),
        graph_versions=[GRAPH_VERSION],
        opset=OPSET,
        graph_ops=sorted(OPS),
        callbacks=hooklab.callback_sessions is not None,
    )


@router.get(
    "/metrics",
    response_class=Response,
    # Prometheus's text format (its version parameter follows the installed library's).
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    # In a thread: scaled out, the workers' series are read from Redis.
    text = await run_in_threadpool(service(request).metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
