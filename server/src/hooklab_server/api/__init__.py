"""The HTTP application: FastAPI routes over the operations, errors as JSON bodies."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hooklab_proto import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE, ErrorCode

from ..engine import HookedTransformer
from ..ops import RequestError, Runner
from ..ops.describe import tokenizer_files
from ..ops.generate import Counters
from ..settings import Settings
from ..store import MemoryStore, Store
from . import patching
from .bodies import error_response
from .generate import router as generate_router
from .routes import router


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
    app.state.counters = Counters()
    app.include_router(router)
    app.include_router(generate_router)
    app.include_router(patching.router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, hint = _validation_message(exc)
        return error_response(RequestError(ErrorCode.VALIDATION, message, hint))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.BAD_REQUEST
        hint = (
            "see /docs or /openapi.json for the routes" if exc.status_code in (404, 405) else None
        )
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(RequestError(code, message, hint, status=exc.status_code))

    app.openapi = lambda: _openapi_with_msgpack(app)  # type: ignore[method-assign]
    return app


def _openapi_with_msgpack(app: FastAPI) -> dict:
    """OpenAPI where every JSON request body is also offered as msgpack (same schema)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                content = operation.get("requestBody", {}).get("content", {})
                if JSON_MEDIA_TYPE in content:
                    content[MSGPACK_MEDIA_TYPE] = content[JSON_MEDIA_TYPE]
        app.openapi_schema = schema
    return app.openapi_schema


__all__ = ["create_app"]
