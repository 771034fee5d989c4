"""``POST /v1/patching``: transport only — parse, validate and run the sweep, send tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hooklab_proto import PatchingRequest

from .openapi import request_body
from .routes import ERRORS, STREAM, tensor_route
from .running import HooklabRoute

router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


@router.post(
    "/v1/patching", responses=STREAM, tags=["patching"],
    openapi_extra=request_body(PatchingRequest),
)  # fmt: skip
async def patching(request: Request) -> Response:
    """TransformerLens ``generic_activation_patch``, batched: ``patching.metric`` [rows] (or
    ``patching.logits`` [rows, batch, positions, d_vocab]); the begin frame holds ``shape``."""
    return await tensor_route(request, PatchingRequest)
