"""The sparse top-k form of cached activations (``sparse_top_k`` on run_with_cache).

An SAE's feature activations are [batch, pos, d_sae] with d_sae in the tens of thousands, and
few of them are large: the k largest per position, as indices and values, carry what a reader
looks at in a small fraction of the bytes. The top-k is taken here, on the dense capture,
before anything is encoded, so the streamed and the JSON responses send only the sparse form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hooklab_proto import (
    SAE_FEATURE_POINTS,
    TOP_K_INDICES_SUFFIX,
    TOP_K_VALUES_SUFFIX,
    ErrorCode,
    RunWithCacheRequest,
)
from hooklab_server.engine.shapes import axis_sizes, hook_shape

from .context import OpsContext
from .errors import RequestError
from .specs import is_pattern, resolve_hook_names


@dataclass(frozen=True)
class TopKForm:
    """Which cached names travel as their top k along the last axis."""

    k: int
    names: frozenset[str]
    saved_elements: int  # dense elements not sent, less the indices and values that are

    def pieces(self, name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """What ``name``'s capture ``value`` travels as: itself, or its indices and values."""
        if name not in self.names:
            return [(name, value)]
        # torch.topk's order: largest first; the values are the dense tensor's own elements.
        values, indices = torch.topk(value, self.k, dim=-1, largest=True, sorted=True)
        # I32 halves the index bytes; every axis is far below 2**31 entries.
        return [
            (name + TOP_K_INDICES_SUFFIX, indices.to(torch.int32)),
            (name + TOP_K_VALUES_SUFFIX, values),
        ]


def stored_top_k(entries: dict[str, torch.Tensor], k_text: str) -> dict[str, torch.Tensor]:
    """A stored cache's entries read in the sparse top-k form (``GET /v1/caches/{id}?top_k=k``,
    a lazy cache's SAE features read sparsely): each entry as its indices and values."""
    k = int(k_text) if k_text.isdigit() and len(k_text) < 10 else 0
    if k < 1:
        raise RequestError(
            ErrorCode.VALIDATION, f"top_k must be a positive integer, got {k_text[:50]!r}"
        )
    for name, value in entries.items():
        if value.dim() == 0 or k > value.shape[-1]:
            last = value.shape[-1] if value.dim() else 0
            raise RequestError(
                ErrorCode.VALIDATION,
                f"top_k={k} is more than the last axis of {name} ({last})",
                "read it without top_k, or ask for fewer",
            )
    form = TopKForm(k, frozenset(entries), 0)
    return dict(piece for name, value in entries.items() for piece in form.pieces(name, value))


def validate_top_k(
    ctx: OpsContext, request: RunWithCacheRequest, names: list[str], batch: int, pos: int
) -> TopKForm | None:
    """The request's ``sparse_top_k`` checked against the names it caches (each must be
    cached, and k at most its last axis), or None when it asks for none."""
    spec = request.sparse_top_k
    if spec is None:
        return None
    if request.lazy or not request.return_cache or not names:
        raise RequestError(
            ErrorCode.VALIDATION,
            "sparse_top_k shapes the activations sent back: it needs cached names, "
            "return_cache and no lazy",
            "a lazy cache keeps the dense activations; read them with GET /v1/caches/{id}",
        )
    model = ctx.model
    cached = set(names)
    if spec.names is None:
        chosen = [name for name in names if name.endswith(SAE_FEATURE_POINTS)]
        if not chosen:
            raise RequestError(
                ErrorCode.VALIDATION,
                "sparse_top_k: no SAE feature activations are cached "
                "('*.hook_sae_acts_pre', '*.hook_sae_acts_post')",
                "cache them, or name the points in sparse_top_k.names",
            )
    else:
        # A glob picks among the names cached; an exact name must be a hook point, and cached.
        matched = [
            match
            for pattern in spec.names
            for match in resolve_hook_names(
                pattern, names if is_pattern(pattern) else model.hook_names
            )
        ]
        missing = sorted(set(matched) - cached)
        if missing:
            raise RequestError(
                ErrorCode.VALIDATION,
                f"sparse_top_k.names: {', '.join(missing[:5])} is not among the names cached",
                "add it to 'names', or leave it out of sparse_top_k.names",
            )
        chosen = list(dict.fromkeys(matched))
    sizes = axis_sizes(model.cfg, batch, pos)
    saved = 0
    for name in chosen:
        shape = [sizes[axis] for axis in hook_shape(name, model.cfg)]
        last = shape[-1]
        if spec.k > last:
            axis = hook_shape(name, model.cfg)[-1]
            raise RequestError(
                ErrorCode.VALIDATION,
                f"sparse_top_k.k={spec.k} is more than the last axis of {name} ({axis}: {last})",
                f"k must be between 1 and {last}",
            )
        rows = math.prod(shape[:-1])
        saved += rows * (last - 2 * spec.k)  # indices and values: about two elements each
    return TopKForm(spec.k, frozenset(chosen), saved)
