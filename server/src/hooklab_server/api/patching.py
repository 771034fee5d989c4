"""``POST /v1/patching``: transport only — parse, validate and run the sweep, send tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hooklab_proto import PatchingRequest, PatchingResult

from .openapi import request_body, tensor_responses
from .routes import ERRORS, tensor_route
from .running import HooklabRoute

router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


@router.post(
    "/v1/patching", responses=tensor_responses(PatchingResult), tags=["patching"],
    openapi_extra=request_body(PatchingRequest),
)  # fmt: skip
async def patching(request: Request) -> Response:
    """TransformerLens ``generic_activation_patch``, batched: ``patching.metric`` shaped as
    the index axes (``shape``: e.g. [layer, pos]; [rows] for explicit index rows), or
    ``patching.logits`` [rows, batch, positions, d_vocab]."""
    return await tensor_route(request, PatchingRequest)
