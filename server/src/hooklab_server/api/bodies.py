"""Transport at the edge: request bodies in JSON or msgpack, read within a size limit and a
deadline, counted before they are decoded and validated (off the event loop); responses as
frame streams or, when asked for, JSON built off the event loop."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import msgspec
import torch
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect
from starlette.types import Send

from hooklab_proto import (
    FRAMES_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    TOO_LARGE_ERROR,
    ErrorCode,
    limits_context,
    stream_chunks,
    stream_length,
    tensor_to_json,
)

from ..ops import CaptureStream, RequestError, TensorsResult, too_large
from ..settings import Settings
from ..tensor_frames import StreamedTensors, capture_frames, encode_frames
from .edge import request_id_of
from .errors import ClientGone, error_body
from .state import service

Model = TypeVar("Model", bound=BaseModel)

_JSON_TYPES = ("application/json",)
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


# --- request bodies ------------------------------------------------------------------------


async def read_body(
    request: Request, limit: int | None = None, setting: str = "max_request_bytes"
) -> bytes:
    """The whole body: refused (413) past ``limit`` (default ``max_request_bytes``), (408) when
    it has not arrived within ``body_timeout_s``; a client that leaves half-way raises
    :class:`ClientGone`."""
    settings = service(request).settings
    limit = settings.max_request_bytes if limit is None else limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large("bytes of request body", int(declared), limit, setting)
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large("or more bytes of request body", size, limit, setting)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), settings.body_timeout_s)
    except TimeoutError:
        service(request).metrics.add("body_timeouts")
        raise RequestError(
            ErrorCode.REQUEST_TIMEOUT,
            f"the request body did not arrive within {settings.body_timeout_s:g} s "
            f"({size} bytes received)",
            "send the whole body at once",
        ) from None
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


def _count_json_items(body: bytes) -> int:
    """An upper bound on the values in a JSON document: every value but the first follows a
    comma, colon or opening bracket (counted at C speed; commas inside strings over-count)."""
    return 1 + sum(body.count(mark) for mark in (b",", b":", b"[", b"{"))


# msgpack type bytes (github.com/msgpack/msgpack/blob/master/spec.md): str/bin with a length
# field of this many bytes; numbers and array/map counts of this many bytes; extension types.
_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4}
_FIXED |= {0xD3: 8, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_UNSIGNED = {1: ">B", 2: ">H", 4: ">I"}


def _count_msgpack_items(body: bytes, limit: int) -> int:
    """The values in a msgpack document, stopping once past ``limit``: a walk over the headers
    that jumps over string, binary and number payloads (a tensor's bin counts once)."""
    count, offset, end = 0, 0, len(body)
    while offset < end and count <= limit:
        first = body[offset]
        count += 1
        offset += 1
        if first <= 0x7F or first >= 0xE0 or 0x80 <= first <= 0x9F or first in (0xC0, 0xC2, 0xC3):
            continue  # fixint, fixmap/fixarray header, nil, bool
        if 0xA0 <= first <= 0xBF:  # fixstr
            offset += first & 0x1F
        elif first in _EXT:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "msgpack extension types are not allowed in a body"
            )
        elif first in _LENGTH:
            width = _LENGTH[first]
            if offset + width > end:
                break  # truncated: the decoder says so
            (length,) = struct.unpack_from(_UNSIGNED[width], body, offset)
            offset += width + length
        elif first in _FIXED:
            offset += _FIXED[first]
        else:
            break  # 0xC1 is never used: the decoder says so
    return count


def _reject_ext(code: int, data: memoryview) -> Any:
    raise RequestError(ErrorCode.BAD_REQUEST, "msgpack extension types are not allowed in a body")


_msgpack_decoder = msgspec.msgpack.Decoder(ext_hook=_reject_ext)


def decode_body(body: bytes, media: str, settings: Settings) -> dict[str, Any]:
    """A JSON object or msgpack map, its values counted before any is built."""
    limit = settings.max_request_items
    if media in _MSGPACK_TYPES:
        count = _count_msgpack_items(body, limit)
    elif media in _JSON_TYPES or media.endswith("+json"):
        count = _count_json_items(body)
    else:
        raise RequestError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported content type {media or '(none)'!r}",
            f"send {JSON_MEDIA_TYPE} or {MSGPACK_MEDIA_TYPE}",
        )
    if count > limit:
        raise too_large(
            "or more values in the request body", count, limit, "max_request_items",
            "send large tensors as msgpack bin (hooklab's tensor maps), or store them first",
        )  # fmt: skip
    try:
        decoded = (
            _msgpack_decoder.decode(body) if media in _MSGPACK_TYPES else msgspec.json.decode(body)
        )
    except RecursionError:
        raise RequestError(
            ErrorCode.BAD_REQUEST, "the body is nested too deeply to decode"
        ) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"the body is not valid {media}: {exc}") from None
    if not isinstance(decoded, dict):
        raise RequestError(
            ErrorCode.VALIDATION,
            f"the body must be a JSON object (a msgpack map), not {type(decoded).__name__}",
        )
    return decoded


def validate_body(data: dict[str, Any], model: type[Model], settings: Settings) -> Model:
    try:
        return model.model_validate(data, context=limits_context(settings.limits()))
    except ValidationError as exc:
        raise validation_error(exc) from None


MAX_PROBLEMS_LISTED = 10


def validation_error(exc: ValidationError) -> RequestError:
    """Every problem with its field's location (up to a bound); a size refusal alone, first."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    refusal = next((error for error in errors if error["type"] == TOO_LARGE_ERROR), None)
    if refusal is not None:
        return RequestError(ErrorCode.TOO_LARGE, _problem(refusal))
    if len(errors) == 1:
        return RequestError(ErrorCode.VALIDATION, _problem(errors[0]))
    listed = "; ".join(_problem(error) for error in errors[:MAX_PROBLEMS_LISTED])
    more = len(errors) - MAX_PROBLEMS_LISTED
    return RequestError(
        ErrorCode.VALIDATION,
        f"{len(errors)} problems in the request body: {listed}"
        + (f"; and {more} more" if more > 0 else ""),
    )


def _problem(error: ErrorDetails) -> str:
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}" if location else error["msg"]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse(
    request: Request,
    model: type[Model],
    limit: int | None = None,
    setting: str = "max_request_bytes",
) -> Model:
    """The request's body as ``model``: read on the event loop (at most ``limit`` bytes, default
    ``max_request_bytes``), counted, decoded and validated in a worker thread."""
    body = await read_body(request, limit, setting)
    settings, media = service(request).settings, _media_type(request)

    def decode_and_validate() -> Model:
        return validate_body(decode_body(body, media, settings), model, settings)

    return await run_in_threadpool(decode_and_validate)


# --- responses -----------------------------------------------------------------------------


def wants_json(request: Request) -> bool:
    """JSON unless the Accept header names the frames media type: what curl and other
    languages read without a decoder; the Python client asks for frames."""
    return FRAMES_MEDIA_TYPE not in request.headers.get("accept", "")


def json_body(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """``{**meta, "tensors": {name: JSON tensor}}`` encoded (slow: run it in a thread)."""
    body = {**meta, "tensors": {name: tensor_to_json(t) for name, t in tensors.items()}}
    return msgspec.json.encode(body)


async def result_response(
    request: Request, result: TensorsResult | StreamedTensors | CaptureStream
) -> Response:
    """A run's result; a worker's frame stream goes out as it arrives when the client wants
    frames (no decoding, no copy), and so do captures made while the forward still runs."""
    if isinstance(result, CaptureStream):
        return ClosingStream(
            capture_frames(result, _error_fields(request)), media_type=FRAMES_MEDIA_TYPE
        )
    if isinstance(result, StreamedTensors):
        if not wants_json(request):
            length = {} if result.nbytes is None else {"content-length": str(result.nbytes)}
            return ClosingStream(result.pieces, media_type=FRAMES_MEDIA_TYPE, headers=length)
        encoded = await result.collected()
        result = await run_in_threadpool(encoded.decoded)
    return await tensors_response(request, result.tensors, result.meta)


def _error_fields(request: Request) -> Callable[[RequestError], dict[str, Any]]:
    """An error frame's fields, for a failure after the response started (its status sent)."""

    def fields(error: RequestError) -> dict[str, Any]:
        service(request).metrics.add("rejected", code=str(error.code))
        body: dict[str, Any] = error_body(error, request_id_of(request.scope))["error"]
        return body

    return fields


class ClosingStream(StreamingResponse):
    """Closes its body generator however the response ends, at once (a client that left, a
    cancelled request): what the generator holds (a job, a slot) is let go now, not when the
    garbage collector finds it."""

    body_iterator: AsyncGenerator[Any, None]

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def tensors_response(
    request: Request, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> Response:
    """Named tensors as a frame stream (with Content-Length), or JSON when asked for."""
    meta = meta or {}
    if wants_json(request):
        content = await run_in_threadpool(json_body, meta, tensors)
        return Response(content, media_type=JSON_MEDIA_TYPE)
    # In a thread too: a device tensor is copied to host memory on the way.
    frames = await run_in_threadpool(encode_frames, meta, tensors)
    return StreamingResponse(
        _chunks(stream_chunks(frames)),
        media_type=FRAMES_MEDIA_TYPE,
        headers={"content-length": str(stream_length(frames))},
    )


async def _chunks(chunks: Iterable[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    # Async on purpose: Starlette would hop to a worker thread for every chunk of a sync one,
    # and producing a chunk here costs no more than that hop (payloads are views).
    for chunk in chunks:
        yield chunk
