"""``POST /v1/integrated_gradients``: transport only — parse, validate and run, send tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hooklab_proto import IntegratedGradientsRequest, IntegratedGradientsResult

from .openapi import request_body, tensor_responses
from .routes import ERRORS, tensor_route
from .running import HooklabRoute

router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


@router.post(
    "/v1/integrated_gradients", responses=tensor_responses(IntegratedGradientsResult),
    tags=["gradients"],
    openapi_extra=request_body(IntegratedGradientsRequest),
)  # fmt: skip
async def integrated_gradients(request: Request) -> Response:
    """Integrated gradients of a metric at one activation: ``integrated_gradients.attributions``
    shaped as the activation; the begin frame holds ``value``, ``baseline_value`` and
    ``convergence_delta``."""
    return await tensor_route(request, IntegratedGradientsRequest)
