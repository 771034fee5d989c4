"""Several requests' forwards as one batch, each row equal to its solo run.

Each request keeps its own token layout; the batch right-extends every request to the longest
one, and the extension columns are masked as keys (positions come from the mask, so a row's
real positions are its own). A request's hook specs and captures see exactly the box of its own
activation — its rows, its columns — shaped as in its solo forward, so batch-coupled specs (mean
over the batch, resample, patch from another prompt) use only its rows, and nobody's specs reach
anyone else's rows. Losses are computed per request, from its own logits.

Rows equal their solo runs within float tolerance, not always bit for bit: a shorter request's
rows attend over masked extension columns and matrix kernels depend on the row count
(scheduling.md §3). Requests only merge when they fire the same conditional hook points, so no
request's arithmetic path changes because of another's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from hooklab_server.engine import Output, lm_cross_entropy_loss
from hooklab_server.engine.catalogue import fires_by_default, hook_shape
from hooklab_server.engine.hook_points import HookFn, HookPoint, HookRun

from .cancel import Cancelled, CancelToken
from .context import OpsContext
from .run import ForwardWork, TensorsResult, finish_forward
from .uploaded_saes import context_of


def merge_key(ctx: OpsContext, work: ForwardWork) -> Hashable | None:
    """Works with equal keys may share a forward; None: this one runs alone (it starts from a
    residual, or runs a backward pass: a batch-reduced objective would mix rows' gradients, or
    hooks a point whose rows flatten batch, position and head together — a work's part of it
    is no box of the merged activation)."""
    request = work.request
    if request.start_at_layer is not None or work.tokens is None or work.backward is not None:
        return None
    cfg = (work.model or ctx.model).cfg
    named = {name for name, _ in work.hooks} | set(work.names)
    if any(_FLATTENED_ROWS & set(hook_shape(name, cfg)) for name in named):
        return None
    conditional = frozenset(n for n in named if not fires_by_default(n, cfg))
    wants_logits = request.stop_at_layer is None and request.return_type is not None
    # Only works with the same uploaded SAEs share a forward: it runs on one model view.
    return (request.stop_at_layer, wants_logits, conditional, frozenset(request.saes))


_FLATTENED_ROWS = frozenset({"head_row", "kv_head_row"})


def padded_tokens(works: list[ForwardWork]) -> int:
    """Tokens a merged forward of ``works`` runs, padding included."""
    rows = sum(int(w.input.shape[0]) for w in works)
    return rows * max(int(w.input.shape[1]) for w in works)


@dataclass
class _Box:
    """Where one work lives in the merged batch."""

    rows: slice
    length: int

    def index(self, name: str, ctx: OpsContext) -> tuple[slice, ...]:
        """The work's part of a hook point's activation: its rows, its own positions."""
        cuts = {"batch": self.rows, "pos": slice(0, self.length), "key_pos": slice(0, self.length)}
        return tuple(cuts.get(axis, slice(None)) for axis in hook_shape(name, ctx.model.cfg))


def _boxed(fn: HookFn, index: tuple[slice, ...]) -> HookFn:
    def apply(value: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        piece = value[index]
        result = fn(piece, hook=hook)
        if result is None or result is piece:
            return None
        out = value.clone()
        out[index] = result
        return out

    return apply


def _capture(store: dict[str, torch.Tensor], name: str, index: tuple[slice, ...]) -> HookFn:
    def keep(value: torch.Tensor, hook: HookPoint) -> None:
        store[name] = value[index].detach().clone()

    return keep


def run_forward_batch(
    ctx: OpsContext,
    works: list[ForwardWork],
    tokens: list[CancelToken],
    on_layer: Callable[[], None],
) -> list[TensorsResult | Exception]:
    """One forward for ``works`` (equal merge keys); each result equals the work's solo
    ``run_forward``. A work whose token is cancelled gets Cancelled; the forward itself stops
    only when every work is cancelled."""
    ctx = context_of(ctx, works[0])  # equal merge keys: the same uploaded SAEs, if any
    model = ctx.model
    length = max(int(w.input.shape[1]) for w in works)
    rows = sum(int(w.input.shape[0]) for w in works)
    ids = torch.zeros(rows, length, dtype=torch.long, device=model.device)
    mask = torch.zeros(rows, length, dtype=torch.long, device=model.device)
    fns: dict[str, list[HookFn]] = {}
    caches: list[dict[str, torch.Tensor]] = []
    boxes: list[_Box] = []
    start = 0
    for work in works:
        count, width = int(work.input.shape[0]), int(work.input.shape[1])
        box = _Box(slice(start, start + count), width)
        ids[box.rows, :width] = work.input
        mask[box.rows, :width] = 1 if work.mask is None else work.mask
        cache: dict[str, torch.Tensor] = {}
        for name, fn in work.hooks:
            fns.setdefault(name, []).append(_boxed(fn, box.index(name, ctx)))
        for name in work.names:  # after the work's own hooks at that point, as in TL
            fns.setdefault(name, []).append(_capture(cache, name, box.index(name, ctx)))
        boxes.append(box)
        caches.append(cache)
        start += count

    def between_layers() -> None:
        if all(token.reason is not None for token in tokens):
            tokens[0].check()
        on_layer()
        for work, cache in zip(works, caches, strict=True):
            if work.stream is not None:  # the blocks before this one are done with captures
                work.stream.send_new(cache)

    request = works[0].request
    out = model.forward(
        ids,
        return_type="logits" if request.stop_at_layer is None else None,
        stop_at_layer=request.stop_at_layer,
        attention_mask=mask,
        hooks=HookRun(fns, interrupt=between_layers, saes=model.saes),
    )
    for work in works:
        if work.stream is not None:
            work.stream.forward_ended()
    results: list[TensorsResult | Exception] = []
    for work, box, cache, token in zip(works, boxes, caches, tokens, strict=True):
        if token.reason is not None:
            results.append(Cancelled(token.reason))
            continue
        own = None if out is None else out[box.rows, : box.length].contiguous()
        results.append(finish_forward(ctx, work, _outputs(work, own), cache))
    return results


def _outputs(work: ForwardWork, own: torch.Tensor | None) -> object:
    """What the engine would have returned for this work alone."""
    request = work.request
    if request.stop_at_layer is not None or request.return_type in (None, "logits"):
        return own
    assert own is not None and work.tokens is not None
    loss = lm_cross_entropy_loss(own, work.tokens, work.mask, request.loss_per_token)
    return loss if request.return_type == "loss" else Output(own, loss)
