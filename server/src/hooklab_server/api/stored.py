"""Stored tensors and caches: store, read, list and delete one's own (an admin: anyone's), and
analyse a stored cache where it is."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import (
    AnalysisRequest,
    AnalysisResult,
    NamedTensors,
    StoredCacheResult,
    StoredObject,
    StoredObjects,
    StoreTensorRequest,
)

from ..auth import Account
from ..ops import objects
from ..settings import Settings
from ..store import Store, StoredInfo
from .bodies import parse, tensors_response, wants_json
from .edge import account_of
from .openapi import request_body, tensor_responses
from .routes import ERRORS, tensor_route
from .running import HooklabRoute
from .state import service

router = APIRouter(route_class=HooklabRoute, responses=ERRORS, tags=["store"])


def _described(info: StoredInfo) -> StoredObject:
    return StoredObject(
        id=info.id,
        kind="tensor" if info.kind == "tensor" else "cache",
        nbytes=info.nbytes,
        expires_at=info.expires_at,
        dtype=info.dtype,
        shape=info.shape,
        names=info.names,
        owner=info.owner,
    )


def _read(request: Request, object_id: str) -> tuple[Store, Settings, Account, str, bool]:
    """The arguments of a stored-object read for this request."""
    hooklab = service(request)
    return (
        hooklab.store,
        hooklab.settings,
        account_of(request.scope),
        object_id,
        wants_json(request),
    )


@router.post(
    "/v1/tensors", response_model=StoredObject, status_code=201,
    openapi_extra=request_body(StoreTensorRequest),
)  # fmt: skip
async def store_tensor(request: Request) -> StoredObject:
    body = await parse(request, StoreTensorRequest)
    store, caller = service(request).store, account_of(request.scope)
    return _described(await run_in_threadpool(objects.store_tensor, store, caller, body))


@router.get("/v1/tensors", response_model=StoredObjects)
async def list_tensors(request: Request) -> StoredObjects:
    """The caller's stored tensors (an admin's: everyone's)."""
    return await _listing(request, "tensor")


@router.get("/v1/caches", response_model=StoredObjects)
async def list_caches(request: Request) -> StoredObjects:
    """The caller's stored caches (an admin's: everyone's)."""
    return await _listing(request, "cache")


async def _listing(request: Request, kind: str) -> StoredObjects:
    store, caller = service(request).store, account_of(request.scope)
    found = await run_in_threadpool(store.listing, kind, caller)
    return StoredObjects(objects=[_described(info) for info in found])


@router.get("/v1/tensors/{object_id}", responses=tensor_responses(NamedTensors))
async def get_tensor(object_id: str, request: Request) -> Response:
    value = await run_in_threadpool(objects.stored_tensor, *_read(request, object_id))
    return await tensors_response(request, {object_id: value})


@router.get("/v1/caches/{object_id}", responses=tensor_responses(StoredCacheResult))
async def get_cache(
    object_id: str,
    request: Request,
    names: Annotated[
        list[str] | None, Query(description="only these entries (a lazy client cache's reads)")
    ] = None,
    # Checked in objects.stored_cache: FastAPI's own 422 would bypass the error envelope.
    wire_dtype: Annotated[
        str | None, Query(description="float16 | bfloat16: floating-point entries travel so")
    ] = None,
    top_k: Annotated[
        str | None,
        Query(
            description="k: each entry as its top k along the last axis, "
            "'{name}.top_k_indices' (I32) and '{name}.top_k_values' (sparse_top_k's form)"
        ),
    ] = None,
) -> Response:
    """A stored cache's activations: all of them, or the entries ``names``."""
    read = _read(request, object_id)
    value = await run_in_threadpool(objects.stored_cache, *read, names, wire_dtype, top_k)
    return await tensors_response(request, value, {"cache_id": object_id})


@router.delete("/v1/tensors/{object_id}", status_code=204)
async def delete_tensor(object_id: str, request: Request) -> Response:
    store = service(request).store
    await run_in_threadpool(store.delete, "tensor", object_id, account_of(request.scope))
    return Response(status_code=204)


@router.delete("/v1/caches/{object_id}", status_code=204)
async def delete_cache(object_id: str, request: Request) -> Response:
    store = service(request).store
    await run_in_threadpool(store.delete, "cache", object_id, account_of(request.scope))
    return Response(status_code=204)


@router.post(
    "/v1/analysis", responses=tensor_responses(AnalysisResult), tags=["analysis"],
    openapi_extra=request_body(AnalysisRequest),
)  # fmt: skip
async def analysis(request: Request) -> Response:
    """An ``ActivationCache`` analysis method run on a stored cache: ``analysis.result``, and
    ``labels`` in the begin frame when asked for."""
    return await tensor_route(request, AnalysisRequest)
