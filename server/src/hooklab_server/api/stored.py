"""Stored tensors and caches: store, read, list and delete one's own (an admin: anyone's)."""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import StoredObject, StoredObjects, StoreTensorRequest

from ..ops import objects
from ..store import Stored
from .bodies import parse, tensors_response, wants_json
from .edge import account_of
from .openapi import request_body
from .routes import ERRORS, STREAM
from .running import HooklabRoute
from .state import service

router = APIRouter(route_class=HooklabRoute, responses=ERRORS, tags=["store"])


def _described(request: Request, stored: Stored) -> StoredObject:
    remaining = service(request).ctx.store.remaining_s(stored)
    value = stored.value
    tensor = value if isinstance(value, torch.Tensor) else None
    return StoredObject(
        id=stored.id,
        kind="tensor" if stored.kind == "tensor" else "cache",
        nbytes=stored.nbytes,
        expires_at=time.time() + remaining,
        dtype=str(tensor.dtype).removeprefix("torch.") if tensor is not None else None,
        shape=list(tensor.shape) if tensor is not None else None,
        names=list(value) if isinstance(value, dict) else None,
        owner=stored.owner,
    )


@router.post(
    "/v1/tensors", response_model=StoredObject, status_code=201,
    openapi_extra=request_body(StoreTensorRequest),
)  # fmt: skip
async def store_tensor(request: Request) -> StoredObject:
    body = await parse(request, StoreTensorRequest)
    ctx = service(request).ctx.as_caller(account_of(request.scope))
    return _described(request, await run_in_threadpool(objects.store_tensor, ctx, body))


@router.get("/v1/tensors", response_model=StoredObjects)
async def list_tensors(request: Request) -> StoredObjects:
    """The caller's stored tensors (an admin's: everyone's)."""
    return _listing(request, "tensor")


@router.get("/v1/caches", response_model=StoredObjects)
async def list_caches(request: Request) -> StoredObjects:
    """The caller's stored caches (an admin's: everyone's)."""
    return _listing(request, "cache")


def _listing(request: Request, kind: str) -> StoredObjects:
    found = service(request).ctx.store.listing(kind, account_of(request.scope))
    return StoredObjects(objects=[_described(request, stored) for stored in found])


@router.get("/v1/tensors/{object_id}", responses=STREAM)
async def get_tensor(object_id: str, request: Request) -> Response:
    ctx = service(request).ctx.as_caller(account_of(request.scope))
    value = objects.stored_tensor(ctx, object_id, wants_json(request))
    return await tensors_response(request, {object_id: value})


@router.get("/v1/caches/{object_id}", responses=STREAM)
async def get_cache(object_id: str, request: Request) -> Response:
    ctx = service(request).ctx.as_caller(account_of(request.scope))
    value = objects.stored_cache(ctx, object_id, wants_json(request))
    return await tensors_response(request, value, {"cache_id": object_id})


@router.delete("/v1/tensors/{object_id}", status_code=204)
async def delete_tensor(object_id: str, request: Request) -> Response:
    service(request).ctx.store.delete("tensor", object_id, account_of(request.scope))
    return Response(status_code=204)


@router.delete("/v1/caches/{object_id}", status_code=204)
async def delete_cache(object_id: str, request: Request) -> Response:
    service(request).ctx.store.delete("cache", object_id, account_of(request.scope))
    return Response(status_code=204)
