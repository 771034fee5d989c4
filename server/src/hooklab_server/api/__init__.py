"""The HTTP application: FastAPI routes over the operations, errors as JSON bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from hooklab_proto import ErrorCode

from ..engine import HookedTransformer
from ..ops import RequestError, Runner
from ..ops.describe import tokenizer_files
from ..settings import Settings
from ..store import MemoryStore, Store
from .routes import error_response, router

logger = logging.getLogger("hooklab_server")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid request")
    return (f"{location}: {message}" if location else message), (
        f"{len(exc.errors())} problems in the request body" if len(exc.errors()) > 1 else None
    )


def create_app(
    model: HookedTransformer, settings: Settings | None = None, store: Store | None = None
) -> FastAPI:
    settings = settings or Settings()
    store = store or MemoryStore(settings.max_stored_bytes, settings.store_ttl_s)
    app = FastAPI(
        title="hooklab",
        version="0.1.0",
        summary="TransformerLens-style run_with_cache / run_with_hooks over HTTP",
    )
    app.state.settings = settings
    app.state.runner = Runner(model, store, settings)
    app.state.tokenizer_files = tokenizer_files(model)
    app.include_router(router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, hint = _validation_message(exc)
        return error_response(RequestError(ErrorCode.VALIDATION, message, hint))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            RequestError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}", status=500)
        )

    return app


__all__ = ["create_app"]
