"""HTTP statuses live here and nowhere else: each error code maps to one status, and every error
leaves the server as ``{"error": {"code", "message", "hint", "request_id"}}``."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse

from hooklab_proto import ErrorCode

from ..ops import RequestError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_HOST: 400,
    ErrorCode.VALIDATION: 422,
    ErrorCode.UNKNOWN_HOOK: 422,
    ErrorCode.BAD_INDEX: 422,
    ErrorCode.BAD_SHAPE: 422,
    ErrorCode.BAD_DTYPE: 422,
    ErrorCode.BAD_VALUE: 422,
    ErrorCode.CONFLICT: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.QUOTA: 429,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.STORE_FULL: 507,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.DEADLINE: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.CALLBACK_FAILED: 424,
    ErrorCode.INTERNAL: 500,
}
# Statuses after which the connection should not be reused (the body may be half read).
CLOSE_AFTER = frozenset({408})


class ClientGone(Exception):
    """The client closed the connection: nothing to answer (logged as one line, not an error)."""


def error_body(error: RequestError, request_id: str | None) -> dict[str, Any]:
    return {
        "error": {
            "code": str(error.code),
            "message": error.message,
            "hint": error.hint,
            "request_id": request_id,
        }
    }


def error_json(error: RequestError, request_id: str | None) -> str:
    """The body as one JSON string (for an SSE ``error`` event)."""
    return json.dumps(error_body(error, request_id))


def error_response(error: RequestError, request_id: str | None) -> JSONResponse:
    status = STATUS[error.code]
    headers = {"connection": "close"} if status in CLOSE_AFTER else {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if error.code == ErrorCode.UNAUTHORIZED:
        headers["www-authenticate"] = 'Bearer realm="hooklab"'
    return JSONResponse(error_body(error, request_id), status_code=status, headers=headers)


def internal_error(exc: BaseException) -> RequestError:
    return RequestError(
        ErrorCode.INTERNAL,
        f"internal error: {type(exc).__name__}",
        "this is a server bug; the request id identifies it in the server's log",
    )
