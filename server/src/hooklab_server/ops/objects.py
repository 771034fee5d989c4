"""Reading and storing tensors: weights by TransformerLens name, stored tensors and caches —
each read checked against the response limits before anything is encoded."""

from __future__ import annotations

import functools

import torch

from hooklab_proto import (
    WIRE_DTYPES,
    CacheEntryInfo,
    ErrorCode,
    StoreTensorRequest,
    dtype_code,
    for_the_wire,
)
from hooklab_server.engine import HookedTransformer

from ..auth import Account
from ..settings import Settings
from ..store import Store, StoredInfo
from .context import OpsContext, decoded_tensor
from .cost import check_response, response_size
from .errors import RequestError, too_large
from .sparse import stored_top_k


@functools.cache
def _weight_names(model: HookedTransformer) -> tuple[str, ...]:
    return tuple(model.parameter_names())


def weight(ctx: OpsContext, name: str, wants_json: bool) -> torch.Tensor:
    """A parameter by TransformerLens name; 404 (with the names that exist) when unknown."""
    try:
        value = ctx.model.parameter(name)
    except KeyError:
        known = _weight_names(ctx.model)
        raise RequestError(
            ErrorCode.NOT_FOUND,
            f"no weight named {name[:100]!r}" + ("…" if len(name) > 100 else ""),
            f"this model has: {' '.join(known)} (per layer: blocks.{{L}}.…)",
        ) from None
    _check_tensors([value], wants_json, ctx.settings)
    return value


def stored_tensor(
    store: Store, settings: Settings, caller: Account, object_id: str, wants_json: bool
) -> torch.Tensor:
    value = store.get("tensor", object_id, caller).value
    assert isinstance(value, torch.Tensor)
    _check_tensors([value], wants_json, settings)
    return value


def stored_cache(
    store: Store,
    settings: Settings,
    caller: Account,
    object_id: str,
    wants_json: bool,
    names: list[str] | None = None,
    wire_dtype: str | None = None,
    top_k: str | None = None,
) -> dict[str, torch.Tensor]:
    """A stored cache, or only its entries ``names`` (a client reading a cache lazily), its
    floating-point tensors as ``wire_dtype`` when given; with ``top_k``, each entry in the
    sparse top-k form (taken before the wire rounding)."""
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"wire_dtype {wire_dtype[:50]!r} is not one of {', '.join(WIRE_DTYPES)}",
        )
    if names is not None and len(names) > settings.max_names:
        raise too_large("names", len(names), settings.max_names, "max_names", None)
    value = store.get("cache", object_id, caller).value
    assert isinstance(value, dict)
    if names is not None:
        missing = [name for name in names if name not in value]
        if missing:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"stored cache {object_id!r} has no entry {missing[0][:200]!r}",
            )
        value = {name: value[name] for name in dict.fromkeys(names)}
    if top_k is not None:
        value = stored_top_k(value, top_k)
    value = {name: for_the_wire(tensor, wire_dtype) for name, tensor in value.items()}
    _check_tensors(list(value.values()), wants_json, settings)
    return value


def cache_entries(cache: dict[str, torch.Tensor]) -> dict[str, CacheEntryInfo]:
    """What a client needs to index a stored cache without its bytes: each entry's shape and
    dtype code."""
    return {
        name: CacheEntryInfo(shape=list(value.shape), dtype=dtype_code(value.dtype))
        for name, value in cache.items()
    }


def store_tensor(store: Store, caller: Account, request: StoreTensorRequest) -> StoredInfo:
    tensor = decoded_tensor(request.tensor, "tensor")
    return store.put("tensor", tensor, caller, request.ttl_s)


def _check_tensors(tensors: list[torch.Tensor], wants_json: bool, settings: Settings) -> None:
    # JSON writes every dtype as numbers; frames keep each tensor's own bytes.
    sent = sum(response_size(t.numel(), t.element_size(), wants_json)[0] for t in tensors)
    check_response(sent, wants_json, settings)
