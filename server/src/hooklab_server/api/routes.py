"""HTTP routes: parse, validate and run through the executor, send the result. No logic here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ForwardRequest,
    ModelInfo,
    RunWithCacheRequest,
    RunWithHooksRequest,
    TokenizeRequest,
    TokenizeResponse,
)

from ..ops import objects
from ..ops.describe import describe_model, detokenize_ids, tokenize_text
from .bodies import parse, tensors_response, wants_json
from .openapi import request_body
from .running import HooklabRoute, cancel_token, run, validate
from .state import service

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 408, 413, 415, 422, 504, 507)
}
STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/vnd.hooklab.frames+msgpack": {}, "application/json": {}}}
}

router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


@router.get("/v1/model", response_model=ModelInfo, tags=["model"])
async def model_info(request: Request) -> ModelInfo:
    ctx = service(request).ctx
    return describe_model(ctx.model, ctx.settings, list(service(request).tokenizer_files))


@router.get("/v1/tokenizer", tags=["model"])
async def tokenizer(request: Request) -> dict[str, dict[str, str]]:
    """The tokenizer's files, so clients can tokenise locally."""
    return {"files": service(request).tokenizer_files}


@router.post(
    "/v1/tokenize", response_model=TokenizeResponse, tags=["model"],
    openapi_extra=request_body(TokenizeRequest),
)  # fmt: skip
async def tokenize(request: Request) -> TokenizeResponse:
    body = await parse(request, TokenizeRequest)
    return await run_in_threadpool(tokenize_text, service(request).ctx, body)


@router.post(
    "/v1/detokenize", response_model=DetokenizeResponse, tags=["model"],
    openapi_extra=request_body(DetokenizeRequest),
)  # fmt: skip
async def detokenize(request: Request) -> DetokenizeResponse:
    body = await parse(request, DetokenizeRequest)
    return await run_in_threadpool(detokenize_ids, service(request).ctx, body)


async def _forward(request: Request, model: type[ForwardRequest]) -> Response:
    body = await parse(request, model)
    token = cancel_token(request, body.timeout_s)  # the deadline covers validation too
    work = await validate(request, body)
    result = await run(request, work, token)
    return await tensors_response(request, result.tensors, result.meta)


@router.post(
    "/v1/forward", responses=STREAM, tags=["run"], openapi_extra=request_body(ForwardRequest)
)
async def forward(request: Request) -> Response:
    """TransformerLens ``forward`` with optional hook specs; returns logits / loss / residual."""
    return await _forward(request, ForwardRequest)


@router.post(
    "/v1/run_with_cache", responses=STREAM, tags=["run"],
    openapi_extra=request_body(RunWithCacheRequest),
)  # fmt: skip
async def run_with_cache(request: Request) -> Response:
    """``run_with_cache``: outputs (``output.*``) then the activations, by hook name."""
    return await _forward(request, RunWithCacheRequest)


@router.post(
    "/v1/run_with_hooks", responses=STREAM, tags=["run"],
    openapi_extra=request_body(RunWithHooksRequest),
)  # fmt: skip
async def run_with_hooks(request: Request) -> Response:
    """A forward under hook specs; with ``names`` it also returns those activations."""
    return await _forward(request, RunWithHooksRequest)


@router.get("/v1/weights/{name:path}", responses=STREAM, tags=["model"])
async def weight(name: str, request: Request) -> Response:
    """Any parameter by TransformerLens name: W_E, W_U, W_Q (stacked), blocks.0.attn.W_O, …"""
    ctx = service(request).ctx
    value = await run_in_threadpool(objects.weight, ctx, name, wants_json(request))
    return await tensors_response(request, {name: value})
