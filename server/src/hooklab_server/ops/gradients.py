"""Backward passes: gradients of a scalar objective with respect to a forward's activations.

A request asks for one with an ``objective`` (a metric of the logits, or a traced function of
them), ``bwd_hooks`` or ``incl_bwd``; with no objective the forward's own loss is the scalar, as
TransformerLens's ``run_with_cache(..., incl_bwd=True)`` backpropagates its output. Weights are
frozen (the engine never tracks them), so a backward writes nothing a later request could see:
its gradients live in the request's own hook run and are returned or dropped with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import ErrorCode, ForwardRequest, PatchMetric
from hooklab_server.engine import HookRun, Output, autograd_on, backward

from .cancel import running_token
from .context import OpsContext
from .errors import RequestError
from .metrics import Metric
from .specs import HookFn, compile_specs

SCALAR_HINT = "return_type='loss' (TransformerLens's incl_bwd), or an 'objective' (a metric)"


@dataclass
class Backward:
    """A validated backward pass: what it starts from and what runs on the way."""

    objective: Metric | None  # None: the forward's loss
    hooks: list[tuple[str, HookFn]]  # backward hook functions, from bwd_hooks specs
    incl_bwd: bool  # return {name}_grad for the names cached


def validate_backward(
    ctx: OpsContext, request: ForwardRequest, tokens: torch.Tensor | None, size: int, length: int
) -> Backward | None:
    if not request.wants_gradients:
        return None
    if request.stop_at_layer is not None:
        raise RequestError(
            ErrorCode.VALIDATION,
            "a backward pass needs the whole forward: no stop_at_layer with incl_bwd, "
            "bwd_hooks or an objective",
        )
    spec, objective = request.objective, None
    if spec is None:
        if request.return_type not in ("loss", "both") or request.loss_per_token:
            raise RequestError(
                ErrorCode.VALIDATION,
                "a backward pass starts from a scalar: with no 'objective' that is the loss, "
                f"and this request asks for return_type={request.return_type!r}"
                + (" per token" if request.loss_per_token else ""),
                SCALAR_HINT,
            )
    else:
        objective = objective_metric(ctx, spec, tokens, size, length, "objective")
    hooks = compile_specs(ctx, request.bwd_hooks, size, length, field="bwd_hooks")
    return Backward(objective, hooks, bool(getattr(request, "incl_bwd", False)))


def backward_hooks(plan: Backward) -> list[tuple[str, HookFn]]:
    """The plan's backward hook functions, each run with this thread's cancellation token: on
    a GPU, autograd calls them from its own device threads, where a paused callback would
    otherwise not see its request cancelled."""
    token = running_token.value

    def on_this_token(fn: HookFn) -> HookFn:
        def run(grad: torch.Tensor, hook: Any) -> torch.Tensor | None:
            before = running_token.value
            running_token.value = token
            try:
                return fn(grad, hook=hook)
            finally:
                running_token.value = before

        return run

    return [(name, on_this_token(fn)) for name, fn in plan.hooks]


def objective_metric(
    ctx: OpsContext,
    spec: PatchMetric,
    tokens: torch.Tensor | None,
    size: int,
    length: int,
    field: str,
) -> Metric:
    """A metric validated as the scalar a backward pass starts from."""
    if spec.kind == "logits":
        raise RequestError(
            ErrorCode.VALIDATION,
            f"{field} kind 'logits' is not a scalar",
            "use logit_diff, logit, prob, logprob, loss or a traced graph",
        )
    if spec.normalize and spec.baselines is None:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"a normalized {field} needs 'baselines' [clean, corrupted] (nothing is measured "
            "before a backward pass)",
        )
    if spec.kind == "loss" and tokens is None:
        raise RequestError(ErrorCode.VALIDATION, f"a loss {field} needs token ids ('tokens')")
    ids = tokens if tokens is not None else torch.zeros(size, length, dtype=torch.long)
    metric = Metric(spec, ids.cpu(), ctx.model.cfg.d_vocab_out)
    if spec.graph is not None:
        metric.compile(ctx, spec.graph, size, length)
    return metric


def forward_backward(
    request: ForwardRequest,
    plan: Backward,
    run: HookRun,
    forward: Callable[..., object],
) -> tuple[object, torch.Tensor]:
    """``forward(return_type=...)`` with autograd on, then the backward from the objective.
    Returns the request's output (detached) and the objective's value."""
    run.gradients = True
    if plan.objective is None:
        out = forward(return_type=request.return_type)
        value = out.loss if isinstance(out, Output) else out
    else:
        wants_loss = request.return_type in ("loss", "both")
        out = forward(return_type="both" if wants_loss else "logits")
        logits = out.logits if isinstance(out, Output) else out
        assert isinstance(logits, torch.Tensor)
        with autograd_on():
            value = plan.objective.normalized(plan.objective.value(logits))
        if request.return_type is None:
            out = None
        elif request.return_type == "logits" and isinstance(out, Output):
            out = out.logits
    assert isinstance(value, torch.Tensor)
    backward_from(value)
    return _detached(out), value.detach().float()


# What autograd says when a hook edited in place a tensor its backward needs.
_IN_PLACE = ("modified by an inplace operation", "is being modified inplace")


def backward_from(objective: torch.Tensor) -> None:
    """The backward pass; a hook's in-place edit that autograd cannot go back through is the
    request's error (TransformerLens fails the same way), not the server's."""
    try:
        backward(objective)
    except RuntimeError as exc:
        if not any(words in str(exc) for words in _IN_PLACE):
            raise
        raise RequestError(
            ErrorCode.VALIDATION,
            "the backward pass cannot go back through a hook's in-place edit: "
            + str(exc).splitlines()[0][:300],
            "edit a copy in the hook (x = x.clone()), as TransformerLens requires",
        ) from None


def _detached(out: object) -> object:
    if isinstance(out, Output):
        return Output(out.logits.detach(), out.loss.detach())
    return out.detach() if isinstance(out, torch.Tensor) else out
