"""HTTP routes: parse, call an operation in a worker thread, send the result. No logic here."""

from __future__ import annotations

import time
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorCode,
    ErrorResponse,
    ForwardRequest,
    ModelInfo,
    RunWithCacheRequest,
    RunWithHooksRequest,
    StoredObject,
    StoreTensorRequest,
    TokenizeRequest,
    TokenizeResponse,
)

from ..ops import RequestError, Runner
from ..ops.describe import describe_model, tokenize_text
from ..ops.run import ids_tensor
from ..store import Stored
from .bodies import BodyRoute, tensors_response

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422, 507)
}
STREAM = {200: {"content": {"application/vnd.hooklab.frames+msgpack": {}, "application/json": {}}}}

router = APIRouter(route_class=BodyRoute, responses=ERRORS)


def _runner(request: Request) -> Runner:
    return request.app.state.runner


def _stored(runner: Runner, stored: Stored) -> StoredObject:
    remaining = runner.store.remaining_s(stored)
    value = stored.value
    return StoredObject(
        id=stored.id,
        kind=stored.kind,  # type: ignore[arg-type]
        nbytes=stored.nbytes,
        expires_at=time.time() + remaining,
        dtype=str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else None,
        shape=list(value.shape) if isinstance(value, torch.Tensor) else None,
        names=list(value) if isinstance(value, dict) else None,
    )


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["service"])
async def readyz(request: Request) -> dict[str, str]:
    return {"status": "ready", "model": _runner(request).model.cfg.model_name}


@router.get("/v1/model", response_model=ModelInfo, tags=["model"])
async def model_info(request: Request) -> ModelInfo:
    runner = _runner(request)
    return describe_model(runner.model, runner.settings, list(request.app.state.tokenizer_files))


@router.get("/v1/tokenizer", tags=["model"])
async def tokenizer(request: Request) -> dict[str, dict[str, str]]:
    """The tokenizer's files, so clients can tokenise locally."""
    return {"files": request.app.state.tokenizer_files}


@router.post("/v1/tokenize", response_model=TokenizeResponse, tags=["model"])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await run_in_threadpool(tokenize_text, _runner(request).model, body)


@router.post("/v1/detokenize", response_model=DetokenizeResponse, tags=["model"])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    model = _runner(request).model
    if model.tokenizer is None:
        raise RequestError(ErrorCode.VALIDATION, "this model has no tokenizer")
    tokens = ids_tensor(body.tokens, "tokens")
    _runner(request).check_vocabulary(tokens)
    text = model.to_string(tokens if isinstance(body.tokens[0], list) else tokens[0])
    return DetokenizeResponse(text=text)


async def _run(body: ForwardRequest, request: Request) -> Response:
    runner = _runner(request)
    result = await run_in_threadpool(runner.run, body)
    meta = {"cache_id": result.cache_id} if result.cache_id else {}
    return tensors_response(request, {**result.outputs, **result.cache}, meta)


@router.post("/v1/forward", responses=STREAM, tags=["run"])
async def forward(body: ForwardRequest, request: Request) -> Response:
    """TransformerLens ``forward`` with optional hook specs; returns logits / loss / residual."""
    return await _run(body, request)


@router.post("/v1/run_with_cache", responses=STREAM, tags=["run"])
async def run_with_cache(body: RunWithCacheRequest, request: Request) -> Response:
    """``run_with_cache``: outputs (``output.*``) then the activations, by hook name."""
    return await _run(body, request)


@router.post("/v1/run_with_hooks", responses=STREAM, tags=["run"])
async def run_with_hooks(body: RunWithHooksRequest, request: Request) -> Response:
    """A forward under hook specs; with ``names`` it also returns those activations."""
    return await _run(body, request)


@router.get("/v1/weights/{name:path}", responses=STREAM, tags=["model"])
async def weight(name: str, request: Request) -> Response:
    """Any parameter by TransformerLens name: W_E, W_U, W_Q (stacked), blocks.0.attn.W_O, …"""
    model = _runner(request).model
    try:
        value = model.parameter(name)
    except KeyError:
        raise RequestError(
            ErrorCode.NOT_FOUND,
            f"no weight named {name!r}",
            "stacked: W_E W_pos W_U b_U W_Q W_K W_V W_O b_Q b_K b_V b_O W_in W_gate W_out b_in "
            "b_out; per layer: blocks.{L}.attn.W_Q, blocks.{L}.ln1.w, ln_final.w, …",
            status=404,
        ) from None
    return tensors_response(request, {name: value})


@router.post("/v1/tensors", response_model=StoredObject, status_code=201, tags=["store"])
async def store_tensor(body: StoreTensorRequest, request: Request) -> StoredObject:
    runner = _runner(request)
    tensor = runner.tensor(body.tensor)
    return _stored(runner, runner.store.put("tensor", tensor, body.ttl_s))


@router.get("/v1/tensors/{object_id}", responses=STREAM, tags=["store"])
async def get_tensor(object_id: str, request: Request) -> Response:
    stored = _runner(request).store.get("tensor", object_id)
    return tensors_response(request, {object_id: stored.value})  # type: ignore[dict-item]


@router.get("/v1/caches/{object_id}", responses=STREAM, tags=["store"])
async def get_cache(object_id: str, request: Request) -> Response:
    stored = _runner(request).store.get("cache", object_id)
    return tensors_response(request, stored.value, {"cache_id": object_id})  # type: ignore[arg-type]


@router.delete("/v1/tensors/{object_id}", status_code=204, tags=["store"])
async def delete_tensor(object_id: str, request: Request) -> Response:
    _runner(request).store.delete("tensor", object_id)
    return Response(status_code=204)


@router.delete("/v1/caches/{object_id}", status_code=204, tags=["store"])
async def delete_cache(object_id: str, request: Request) -> Response:
    _runner(request).store.delete("cache", object_id)
    return Response(status_code=204)
