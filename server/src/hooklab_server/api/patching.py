"""``POST /v1/patching``: transport only — parse, run the sweep in a worker thread, send tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import PatchingRequest

from ..ops.patching import Patcher
from .bodies import BodyRoute, tensors_response
from .routes import ERRORS, STREAM

router = APIRouter(route_class=BodyRoute, responses=ERRORS)


@router.post("/v1/patching", responses=STREAM, tags=["patching"])
async def patching(body: PatchingRequest, request: Request) -> Response:
    """TransformerLens ``generic_activation_patch``, batched: ``patching.metric`` [rows] (or
    ``patching.logits`` [rows, batch, positions, d_vocab]); the begin frame holds ``shape``."""
    result = await run_in_threadpool(Patcher(request.app.state.runner).run, body)
    return tensors_response(request, result.tensors, result.meta)
