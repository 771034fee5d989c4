"""Reading and storing tensors: weights by TransformerLens name, stored tensors and caches —
each read checked against the response limits before anything is encoded."""

from __future__ import annotations

import functools

import torch

from hooklab_proto import ErrorCode, StoreTensorRequest
from hooklab_server.engine import HookedTransformer

from ..store import StoredInfo
from .context import OpsContext
from .cost import check_response, response_size
from .errors import RequestError


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
    _check_tensors([value], wants_json, ctx)
    return value


def stored_tensor(ctx: OpsContext, object_id: str, wants_json: bool) -> torch.Tensor:
    value = ctx.store.get("tensor", object_id, ctx.caller).value
    assert isinstance(value, torch.Tensor)
    _check_tensors([value], wants_json, ctx)
    return value


def stored_cache(ctx: OpsContext, object_id: str, wants_json: bool) -> dict[str, torch.Tensor]:
    value = ctx.store.get("cache", object_id, ctx.caller).value
    assert isinstance(value, dict)
    _check_tensors(list(value.values()), wants_json, ctx)
    return value


def store_tensor(ctx: OpsContext, request: StoreTensorRequest) -> StoredInfo:
    tensor = ctx.tensor(request.tensor, "tensor")
    return ctx.store.put("tensor", tensor, ctx.caller, request.ttl_s)


def _check_tensors(tensors: list[torch.Tensor], wants_json: bool, ctx: OpsContext) -> None:
    # JSON writes every dtype as numbers; frames keep each tensor's own bytes.
    sent = sum(response_size(t.numel(), t.element_size(), wants_json)[0] for t in tensors)
    check_response(sent, wants_json, ctx.settings)
