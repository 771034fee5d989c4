"""HTTP routes: parse, validate and run through the executor, send the result. No logic here."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import (
    AnalysisRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ForwardRequest,
    ForwardResult,
    IntegratedGradientsRequest,
    ModelCard,
    ModelInfo,
    ModelsResponse,
    NamedTensors,
    PatchingRequest,
    RunResult,
    RunWithCacheRequest,
    RunWithHooksRequest,
    ServedModel,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerFiles,
)

from ..models import ModelEntry
from ..ops.describe import describe_model, detokenize_ids, tokenize_text
from .bodies import parse, result_response, wants_json
from .edge import account_of
from .openapi import error_responses, request_body, tensor_responses
from .running import HooklabRoute, cancel_token, run, validate
from .state import model_entry, service

ERRORS = error_responses()
# Not length-checked here: FastAPI's own 422 would bypass the error envelope, and the lookup
# answers any unknown name (cut to 100 characters) the same way.
ModelQuery = Annotated[str | None, Query(description="which served model (default: the first)")]
router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


def _described(request: Request, entry: ModelEntry) -> ModelInfo:
    model = entry.operations.ctx.model
    return describe_model(model, service(request).settings, list(entry.tokenizer_files))


@router.get("/v1/models", response_model=ModelsResponse, tags=["model"])
async def models(request: Request) -> ModelsResponse:
    """Every served model with its config and live workers, the default first."""
    served = await service(request).models.listing()
    models = [
        ServedModel(**_described(request, entry).model_dump(), workers=entry.workers)
        for entry in served
    ]
    return ModelsResponse(models=models, data=[ModelCard(id=m.model_name) for m in models])


@router.get("/v1/model", response_model=ModelInfo, tags=["model"])
async def model_info(request: Request, model: ModelQuery = None) -> ModelInfo:
    return _described(request, await model_entry(request, model))


@router.get("/v1/tokenizer", response_model=TokenizerFiles, tags=["model"])
async def tokenizer(request: Request, model: ModelQuery = None) -> TokenizerFiles:
    """The tokenizer's files, so clients can tokenise locally."""
    return TokenizerFiles(files=(await model_entry(request, model)).tokenizer_files)


@router.post(
    "/v1/tokenize", response_model=TokenizeResponse, tags=["model"],
    openapi_extra=request_body(TokenizeRequest),
)  # fmt: skip
async def tokenize(request: Request) -> TokenizeResponse:
    body = await parse(request, TokenizeRequest)
    ctx = (await model_entry(request, body.model)).operations.ctx
    return await run_in_threadpool(tokenize_text, ctx, body)


@router.post(
    "/v1/detokenize", response_model=DetokenizeResponse, tags=["model"],
    openapi_extra=request_body(DetokenizeRequest),
)  # fmt: skip
async def detokenize(request: Request) -> DetokenizeResponse:
    body = await parse(request, DetokenizeRequest)
    ctx = (await model_entry(request, body.model)).operations.ctx
    return await run_in_threadpool(detokenize_ids, ctx, body)


TensorRequest = ForwardRequest | PatchingRequest | IntegratedGradientsRequest | AnalysisRequest


async def tensor_route(request: Request, model: type[TensorRequest]) -> Response:
    """A route whose work runs on the executor and answers tensors."""
    body = await parse(request, model)
    token = cancel_token(request, body.timeout_s)  # the deadline covers validation too
    entry = await model_entry(request, body.model)
    work = await validate(request, entry, body)
    return await result_response(request, await run(request, entry, work, token))


@router.post(
    "/v1/forward", responses=tensor_responses(ForwardResult), tags=["run"],
    openapi_extra=request_body(ForwardRequest),
)  # fmt: skip
async def forward(request: Request) -> Response:
    """TransformerLens ``forward`` with optional hook specs; returns logits / loss / residual."""
    return await tensor_route(request, ForwardRequest)


@router.post(
    "/v1/run_with_cache", responses=tensor_responses(RunResult), tags=["run"],
    openapi_extra=request_body(RunWithCacheRequest),
)  # fmt: skip
async def run_with_cache(request: Request) -> Response:
    """``run_with_cache``: the activations by hook name and the outputs (``output.*``); a cache
    returned as frames starts streaming while the forward runs."""
    return await tensor_route(request, RunWithCacheRequest)


@router.post(
    "/v1/run_with_hooks", responses=tensor_responses(RunResult), tags=["run"],
    openapi_extra=request_body(RunWithHooksRequest),
)  # fmt: skip
async def run_with_hooks(request: Request) -> Response:
    """A forward under hook specs; with ``names`` it also returns those activations."""
    return await tensor_route(request, RunWithHooksRequest)


@router.get("/v1/weights/{name:path}", responses=tensor_responses(NamedTensors), tags=["model"])
async def weight(name: str, request: Request, model: ModelQuery = None) -> Response:
    """Any parameter by TransformerLens name: W_E, W_U, W_Q (stacked), blocks.0.attn.W_O, …"""
    entry = await model_entry(request, model)
    caller, token = account_of(request.scope), cancel_token(request, None)
    value = await entry.read_weight(name, caller, wants_json(request), token)
    return await result_response(request, value)
