"""``POST /v1/generate`` (JSON, or server-sent events with ``stream``) and ``GET /metrics``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from hooklab_proto import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_TOKEN,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
)

from ..ops import RequestError
from ..ops.generate import Counters, Generation
from .bodies import BodyRoute

router = APIRouter(
    route_class=BodyRoute,
    responses={status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422)},
)


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def _counters(request: Request) -> Counters:
    return request.app.state.counters


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    tags=["run"],
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    """TransformerLens ``generate`` with hook specs active at every step. With ``stream`` the
    tokens arrive as server-sent events (``token`` per step, then ``done`` or ``error``);
    closing the connection stops the generation at the next step."""
    runner = request.app.state.runner
    generation = await run_in_threadpool(Generation, runner, body, _counters(request))
    if not body.stream:
        return await run_in_threadpool(generation.run)
    return StreamingResponse(
        _events(generation, request),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


async def _events(generation: Generation, request: Request) -> AsyncIterator[bytes]:
    steps = iter(generation)
    finished = False
    try:
        while True:
            if await request.is_disconnected():
                break
            step = await run_in_threadpool(next, steps, None)
            if step is None:
                break
            yield _event(EVENT_TOKEN, step.model_dump_json())
        response = await run_in_threadpool(generation.response)
        finished = True
        yield _event(EVENT_DONE, response.model_dump_json())
    except RequestError as error:
        finished = True
        body = {"error": {"code": str(error.code), "message": error.message, "hint": error.hint}}
        yield _event(EVENT_ERROR, json.dumps(body))
    finally:
        if not finished:  # the client went away: count it, and run no further step
            generation.cancel()


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"])
async def metrics(request: Request) -> str:
    """Prometheus text format."""
    lines = []
    for name, value in _counters(request).values.items():
        lines += [f"# TYPE hooklab_{name}_total counter", f"hooklab_{name}_total {value}"]
    return "\n".join(lines) + "\n"
