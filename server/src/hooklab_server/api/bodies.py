"""Transport at the edge: request bodies in JSON or msgpack (size-limited), and responses as
frame streams or JSON depending on ``Accept``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import msgspec
import torch
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from hooklab_proto import (
    FRAMES_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    ErrorCode,
    encode_control,
    encode_tensor,
    stream_chunks,
    stream_length,
    tensor_to_json,
)

from ..ops import RequestError

logger = logging.getLogger("hooklab_server")

_JSON_TYPES = ("application/json",)
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            ErrorCode.TOO_LARGE, f"request body of {declared} bytes exceeds {limit}", status=413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                ErrorCode.TOO_LARGE, f"request body exceeds {limit} bytes", status=413
            )
        chunks.append(chunk)
    return b"".join(chunks)


class _DecodedRequest(Request):
    """A request whose ``json()`` is the already-decoded JSON or msgpack body."""

    decoded: Any = None

    async def json(self) -> Any:
        return self.decoded


class BodyRoute(APIRoute):
    """Routes whose pydantic body may arrive as JSON or msgpack, within the body-size limit.

    FastAPI validates the body through ``request.json()``; for msgpack we decode first and
    present the result the same way, so one schema serves both encodings (and OpenAPI).
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await decoded_route(request)
            except (RequestError, RequestValidationError, HTTPException):
                raise  # answered by the app's handlers, keeping the connection open
            except Exception as exc:
                # Answer here rather than in a catch-all handler: Starlette re-raises those
                # into the server, which then drops the keep-alive connection.
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return error_response(
                    RequestError(
                        ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}", status=500
                    )
                )

        async def decoded_route(request: Request) -> Response:
            if request.method not in ("POST", "PUT", "PATCH"):
                return await handler(request)
            limit = request.app.state.settings.max_request_bytes
            body = await read_body(request, limit)
            media = _media_type(request)
            try:
                if media in _MSGPACK_TYPES:
                    decoded = msgspec.msgpack.decode(body)
                elif media in _JSON_TYPES or media.endswith("+json"):
                    decoded = msgspec.json.decode(body)
                else:
                    raise RequestError(
                        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                        f"unsupported content type {media or '(none)'!r}",
                        f"send {JSON_MEDIA_TYPE} or {MSGPACK_MEDIA_TYPE}",
                        status=415,
                    )
            except RecursionError:
                raise RequestError(
                    ErrorCode.BAD_REQUEST, "the body is nested too deeply to decode", status=400
                ) from None
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise RequestError(
                    ErrorCode.BAD_REQUEST, f"the body is not valid {media}: {exc}", status=400
                ) from None
            scope = dict(request.scope)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*headers, (b"content-type", JSON_MEDIA_TYPE.encode())]
            wrapped = _DecodedRequest(scope, request.receive)
            wrapped._body = body
            wrapped.decoded = decoded
            return await handler(wrapped)

        return route


def error_response(error: RequestError) -> JSONResponse:
    body = {"error": {"code": str(error.code), "message": error.message, "hint": error.hint}}
    return JSONResponse(body, status_code=error.status)


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return JSON_MEDIA_TYPE in accept and FRAMES_MEDIA_TYPE not in accept


def tensors_response(
    request: Request,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
) -> Response:
    """Named tensors as a frame stream (with Content-Length), or JSON when asked for."""
    meta = meta or {}
    if wants_json(request):
        body = {**meta, "tensors": {name: tensor_to_json(t) for name, t in tensors.items()}}
        return JSONResponse(body)
    started = time.perf_counter()
    frames = [
        encode_control("begin", n_tensors=len(tensors), **meta),
        *(encode_tensor(tensor, name) for name, tensor in tensors.items()),
    ]
    total_bytes = sum(frame.payload.nbytes for frame in frames)
    frames.append(
        encode_control(
            "end", stats={"tensor_bytes": total_bytes, "encode_s": time.perf_counter() - started}
        )
    )
    return StreamingResponse(
        _chunks(frames),
        media_type=FRAMES_MEDIA_TYPE,
        headers={"content-length": str(stream_length(frames))},
    )


async def _chunks(frames: Iterable[Any]) -> AsyncIterator[bytes | memoryview]:
    # Async on purpose: Starlette would hop to a worker thread for every chunk of a sync one,
    # and producing a chunk here costs no more than that hop (payloads are views).
    for chunk in stream_chunks(frames):
        yield chunk
