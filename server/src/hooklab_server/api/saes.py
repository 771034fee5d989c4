"""Uploaded sparse autoencoders: upload one's own (SAELens's format), list and delete them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import SaeInfo, SaeList, SaeUploadRequest

from ..ops import uploaded_saes
from ..store import StoredInfo
from .bodies import parse
from .edge import account_of
from .openapi import request_body
from .routes import ERRORS
from .running import HooklabRoute
from .state import model_entry, service

router = APIRouter(route_class=HooklabRoute, responses=ERRORS, tags=["saes"])


def _described(info: StoredInfo) -> SaeInfo:
    details = info.details or {}
    return SaeInfo(
        id=info.id,
        hook=str(details.get("hook", "")),
        d_in=int(details.get("d_in", 0)),
        d_sae=int(details.get("d_sae", 0)),
        architecture=str(details.get("architecture", "")),
        nbytes=info.nbytes,
        expires_at=info.expires_at,
        owner=info.owner,
    )


@router.post(
    "/v1/saes", response_model=SaeInfo, status_code=201,
    openapi_extra=request_body(SaeUploadRequest),
)  # fmt: skip
async def upload_sae(request: Request) -> SaeInfo:
    """Upload an SAE in SAELens's saved format (cfg.json and sae_weights.safetensors), owned by
    the key and counted in its stored bytes; name its id in a request's ``saes`` to attach it."""
    hooklab = service(request)
    limit = uploaded_saes.body_limit(hooklab.settings)
    body = await parse(request, SaeUploadRequest, limit, "max_sae_bytes")
    entry = await model_entry(request, body.model)
    info = await run_in_threadpool(
        uploaded_saes.upload,
        hooklab.store,
        entry.operations.ctx.model,
        hooklab.settings,
        account_of(request.scope),
        body,
    )
    return _described(info)


@router.get("/v1/saes", response_model=SaeList)
async def list_saes(request: Request) -> SaeList:
    """The caller's uploaded SAEs (an admin's: everyone's)."""
    store, caller = service(request).store, account_of(request.scope)
    found = await run_in_threadpool(uploaded_saes.listing, store, caller)
    return SaeList(saes=[_described(info) for info in found])


@router.delete("/v1/saes/{sae_id}", status_code=204)
async def delete_sae(sae_id: str, request: Request) -> Response:
    store, caller = service(request).store, account_of(request.scope)
    await run_in_threadpool(uploaded_saes.delete, store, caller, sae_id)
    return Response(status_code=204)
