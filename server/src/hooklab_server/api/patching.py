"""``POST /v1/patching``: transport only — parse, validate and run the sweep, send tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hooklab_proto import PatchingRequest

from .bodies import parse, result_response
from .openapi import request_body
from .routes import ERRORS, STREAM
from .running import HooklabRoute, cancel_token, run, validate
from .state import model_entry

router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


@router.post(
    "/v1/patching", responses=STREAM, tags=["patching"],
    openapi_extra=request_body(PatchingRequest),
)  # fmt: skip
async def patching(request: Request) -> Response:
    """TransformerLens ``generic_activation_patch``, batched: ``patching.metric`` [rows] (or
    ``patching.logits`` [rows, batch, positions, d_vocab]); the begin frame holds ``shape``."""
    body = await parse(request, PatchingRequest)
    token = cancel_token(request, body.timeout_s)  # the deadline covers validation too
    entry = await model_entry(request, body.model)
    work = await validate(request, entry, body)
    return await result_response(request, await run(request, entry, work, token))
