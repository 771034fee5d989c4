"""The HTTP application: routes over the operations behind the execution seam; every error a
JSON body with its status chosen in ``api/errors.py``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hooklab_proto import ErrorCode

from ..auth import KeyRing
from ..callbacks import CallbackSessions, LocalCallbacks
from ..engine import HookedTransformer
from ..execution import Executor
from ..metrics import Metrics
from ..models import EmbeddedModels, ModelSet
from ..ops import Operations, OpsContext, RequestError
from ..ops.describe import tokenizer_files
from ..quotas import MemoryQuotas, Quotas
from ..scheduler import SchedulerExecutor
from ..settings import Settings
from ..store import MemoryStore, Store
from . import (
    accounts,
    callbacks,
    generate,
    gradients,
    openai,
    patching,
    routes,
    saes,
    service,
    stored,
    web,
)
from .edge import EdgeMiddleware, request_id_of
from .errors import error_response
from .openapi import openapi_schema
from .state import Service

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def create_app(
    model: HookedTransformer | None = None,
    settings: Settings | None = None,
    store: Store | None = None,
    executor: Executor | None = None,
    keys: KeyRing | None = None,
    *,
    models: ModelSet | None = None,
    quotas: Quotas | None = None,
    metrics: Metrics | None = None,
    callback_sessions: CallbackSessions | None = None,
) -> FastAPI:
    """An embedded server over ``model`` (the scheduler runs it in this process), or, given
    ``models`` (with the store and quotas they share), the API tier over them."""
    settings = settings or Settings()
    keys = keys or KeyRing(settings.keys_file, settings.quotas())
    store = store or MemoryStore(
        settings.max_stored_bytes, settings.store_ttl_s, settings.max_stored_objects
    )
    metrics = metrics or Metrics()
    metrics.sampled(
        "stored_bytes", "bytes stored, by the key that stored them", "key", store.bytes_by_owner
    )
    if models is None:
        assert model is not None, "an embedded server needs its model"
        local = LocalCallbacks()
        callback_sessions = local
        operations = Operations(
            OpsContext(model, store, settings, metrics, keys.open_account(), local)
        )
        executor = executor or SchedulerExecutor(operations, metrics, settings)
        models = EmbeddedModels(operations, executor, tokenizer_files(model))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        hooklab: Service = app.state.hooklab
        await hooklab.models.aclose()

    app = FastAPI(
        title="hooklab",
        version="0.1.0",
        summary="TransformerLens-style run_with_cache / run_with_hooks over HTTP",
        lifespan=lifespan,
    )
    app.state.hooklab = Service(
        models, store, settings, metrics, keys, quotas or MemoryQuotas(), callback_sessions
    )
    modules = (service, routes, stored, saes, accounts, generate, openai, patching, gradients)
    # callbacks: the websocket; web: the teaching page (GET / and its files under /ui/).
    routers = [module.router for module in (*modules, callbacks, web)]
    for router in routers:
        app.include_router(router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Routing errors (no such route, wrong method) in the same envelope."""
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
        error = RequestError(
            code,
            f"{exc.detail}: {request.method} {request.url.path[:200]}",
            "see /docs or /openapi.json for the routes",
        )
        return error_response(error, request_id_of(request.scope))

    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        keys=keys,
        allowed_hosts=settings.open_hosts,
        write_timeout_s=settings.write_timeout_s,
        route_templates=[getattr(route, "path", "") for r in routers for route in r.routes],
    )
    return app


__all__ = ["create_app"]
