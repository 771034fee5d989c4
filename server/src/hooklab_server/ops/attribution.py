"""Attribution patching: the linear approximation of an activation-patching sweep.

Patching the clean activation's slice ``s`` into the corrupted run changes the metric by about
``sum over s of grad * (clean - corrupted)``, with the gradient of the metric taken on the
corrupted run (TransformerLens's Attribution Patching demo). So one forward and one backward of
the corrupted run, and the clean activations (one forward of the clean run, unless they were
sent or stored), answer every index row of the sweep at once: the rows only pick which entries
of ``grad * (clean - corrupted)`` are summed. Each row's value is the estimated metric of its
patched run (the corrupted metric plus that sum), in the units activation patching returns, so
the two sweeps compare cell by cell.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

from hooklab_proto import PatchingFields
from hooklab_server.engine import autograd_on

from .cancel import CancelToken
from .context import OpsContext
from .gradients import backward_from

if TYPE_CHECKING:
    from .patching import PatchingWork, _Plan


def attribution_steps(
    ctx: OpsContext, work: PatchingWork, token: CancelToken
) -> Generator[None, None, tuple[torch.Tensor, PatchingFields, torch.Tensor, torch.Tensor | None]]:
    """Runs the clean forward (when needed) and the corrupted forward and backward; returns the
    estimated metric per row, the response's meta fields, and the corrupted and clean logits
    (for baselines)."""
    model, plan = ctx.model, work.plan
    names = {layer: plan.hook(layer) for layer in work.layers}
    mask = work.corrupted.mask

    clean, clean_logits = work.clean_activations, None
    if work.clean_tokens is not None:
        clean_logits, found = model.run_with_cache(
            work.clean_tokens.tokens, names_filter=list(names.values()),
            attention_mask=work.clean_tokens.mask, interrupt=token.check,
        )  # fmt: skip
        clean = {layer: found[name] for layer, name in names.items()}
        ctx.metrics.add("work_units", op=work.op)
        yield

    run = model.hook_run(
        names_filter=list(names.values()), capture=True, interrupt=token.check, incl_bwd=True
    )
    logits = model.forward(work.corrupted.tokens, attention_mask=mask, hooks=run)
    with autograd_on():
        value = work.metric.value(logits)
    backward_from(value)
    ctx.metrics.add("work_units", op=work.op)
    token.check()

    estimate = torch.empty(len(plan.rows))
    for layer, name in names.items():
        grad = run.cache.get(f"{name}_grad")
        contribution = torch.zeros_like(run.cache[name]) if grad is None else grad
        contribution = contribution * (clean[layer] - run.cache[name])
        members = [i for i, row in enumerate(plan.rows) if row[0] == layer]
        estimate[members] = _summed_by_row(plan, contribution, [plan.rows[i] for i in members])
    estimate = estimate + value.detach().float().cpu()
    fields = PatchingFields(
        shape=plan.shape, axes=plan.axes, rows=len(plan.rows),
        forwards=1 + (work.clean_tokens is not None), backwards=1, copies_per_forward=1,
    )  # fmt: skip
    return estimate, fields, logits.detach(), clean_logits


def _summed_by_row(
    plan: _Plan, contribution: torch.Tensor, rows: list[tuple[int, ...]]
) -> torch.Tensor:
    """Per row, the sum of ``contribution`` over the slice that row patches (the batch axis and
    every activation axis the row does not index)."""
    indexed = [plan.axis_of[axis] for axis in plan.axes[1:]]
    others = [dim for dim in range(contribution.dim()) if dim not in indexed]
    grid = contribution.float().sum(dim=others) if others else contribution.float()
    # The summed tensor keeps the indexed axes in activation order; put them in the row's order.
    ascending = sorted(indexed)
    grid = grid.permute([ascending.index(dim) for dim in indexed])
    if not indexed:
        return grid.reshape(1).expand(len(rows)).cpu()
    picks = tuple(torch.tensor([row[i] for row in rows]) for i in range(1, len(plan.axes)))
    return grid.cpu()[picks]
