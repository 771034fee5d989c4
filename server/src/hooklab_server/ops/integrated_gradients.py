"""Integrated gradients (``POST /v1/integrated_gradients``): the activation at one hook point
moves from a baseline to the input's in ``steps`` points; at each, the gradient of the metric
there; their mean times ``input - baseline`` is the attribution of each entry.

The steps are copies of the batch in one forward and backward (as many as the memory budget
allows per forward; the gradients of each chunk summed), each copy's activation replaced at the
hook point by its point on the path. The metric of each copy is that copy's own (it reduces over
the copy's batch rows), and the objective is their sum, so every copy's gradient is its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from hooklab_proto import (
    IG_ATTRIBUTIONS,
    ErrorCode,
    IntegratedGradientsFields,
    IntegratedGradientsRequest,
)
from hooklab_server.engine import HookedTransformer, HookPoint, autograd_on
from hooklab_server.engine.catalogue import axis_sizes, hook_shape

from ..auth import Account
from .cancel import CancelToken
from .context import OpsContext
from .cost import Cost, backward_bytes, check_response, response_size, with_slack
from .errors import RequestError
from .gradients import backward_from, objective_metric
from .inputs import TokenBatch, token_batch
from .metrics import Metric
from .patching import check_sweep_forwards
from .run import TensorsResult
from .specs import is_pattern, resolve_hook_names


@dataclass
class IntegratedGradientsWork:
    """A validated integrated-gradients request: inputs resolved, chunks fixed, cost known."""

    input: TokenBatch
    hook: str
    stop_at_layer: int | None  # a forward reaching the hook point only, for its activation
    positions: list[int] | None
    baseline: torch.Tensor | None  # broadcasting to the activation; None: zeros
    baseline_input: TokenBatch | None
    metric: Metric
    alphas: list[float]
    per_forward: int  # copies (steps) per forward and backward
    request: IntegratedGradientsRequest
    cost: Cost
    caller: Account
    wants_json: bool
    op: str = "integrated_gradients"
    # The model as this request sees it (its uploaded SAEs attached); None: the served one.
    model: HookedTransformer | None = None


def validate_integrated_gradients(
    ctx: OpsContext, request: IntegratedGradientsRequest, wants_json: bool
) -> IntegratedGradientsWork:
    model, cfg, settings = ctx.model, ctx.model.cfg, ctx.settings
    given = token_batch(ctx, request.input, "input", request.prepend_bos, None)
    batch, pos = given.batch, given.pos
    if is_pattern(request.hook):
        raise RequestError(
            ErrorCode.VALIDATION,
            f"'hook' is a pattern ({request.hook!r}); integrated gradients attribute one hook "
            "point, named exactly",
        )
    (hook,) = resolve_hook_names(request.hook, model.hook_names)
    shape = hook_shape(hook, cfg)
    full = [axis_sizes(cfg, batch, pos)[axis] for axis in shape]  # the activation's shape
    positions = None
    if request.positions is not None:
        if len(shape) < 2 or shape[1] != "pos":
            raise RequestError(
                ErrorCode.VALIDATION, f"{hook!r} {list(shape)} has no pos axis for 'positions'"
            )
        bad = [p for p in request.positions if not -pos <= p < pos]
        if bad:
            raise RequestError(ErrorCode.BAD_INDEX, f"position {bad[0]} is outside 0..{pos - 1}")
        positions = sorted({p % pos for p in request.positions})
    baseline, baseline_input = None, None
    if request.baseline is not None:
        baseline = ctx.finite_tensor(request.baseline, "baseline").to(model.device, cfg.dtype)
    elif request.baseline_input is not None:
        baseline_input = token_batch(
            ctx, request.baseline_input, "baseline_input", request.prepend_bos, None
        )
        if baseline_input.tokens.shape != given.tokens.shape:
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"baseline_input {list(baseline_input.tokens.shape)} and input "
                f"{list(given.tokens.shape)} differ in shape",
            )
    metric = objective_metric(ctx, request.metric, given.tokens, batch, pos, "metric")
    if baseline is not None:
        _check_broadcast(baseline, full, hook)

    per_copy = backward_bytes(model, batch, pos)
    per_forward = max(1, min(request.steps, settings.patching_budget_bytes // per_copy))
    per_forward = max(1, min(per_forward, settings.max_tokens // max(1, batch * pos)))
    # Chunks, the input's activation (and the baseline input's), the path's two ends.
    forwards = math.ceil(request.steps / per_forward) + 2 + (baseline_input is not None)
    check_sweep_forwards(
        ctx, forwards, f"{request.steps} steps at {per_forward} per forward and backward",
        "take fewer steps", "or a shorter input",
    )  # fmt: skip
    sent, building = response_size(math.prod(full), 4, wants_json)
    check_response(sent, wants_json, settings)
    steps = request.steps
    alphas = [(k + 0.5) / steps for k in range(steps)]
    layer = HookPoint(hook).layer() if hook.startswith("blocks.") else None
    stop = 0 if hook in ("hook_embed", "hook_pos_embed") else (None if layer is None else layer + 1)
    peak = per_forward * per_copy + building
    tokens = (steps + 2) * batch * pos
    return IntegratedGradientsWork(
        given, hook, stop, positions, baseline, baseline_input, metric, alphas, per_forward,
        request, Cost(tokens, forwards, with_slack(peak), sent, with_slack(per_forward * per_copy)),
        ctx.caller, wants_json,
    )  # fmt: skip


def _check_broadcast(baseline: torch.Tensor, full: list[int], hook: str) -> None:
    try:
        if list(torch.broadcast_shapes(tuple(baseline.shape), tuple(full))) != full:
            raise RuntimeError
    except RuntimeError:
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"baseline {list(baseline.shape)} does not broadcast to {hook!r} {full}",
        ) from None


def integrated_gradients_steps(
    ctx: OpsContext, work: IntegratedGradientsWork, token: CancelToken
) -> Generator[None, None, TensorsResult]:
    model, hook, metric = ctx.model, work.hook, work.metric
    tokens, mask = work.input.tokens, work.input.mask
    batch = work.input.batch

    def activation(inputs: TokenBatch) -> torch.Tensor:
        _, cache = model.run_with_cache(
            inputs.tokens, names_filter=[hook], attention_mask=inputs.mask,
            stop_at_layer=work.stop_at_layer, interrupt=token.check,
        )  # fmt: skip
        return cache[hook]

    start = activation(work.input)
    ctx.metrics.add("work_units", op=work.op)
    yield
    if work.baseline_input is not None:
        base = activation(work.baseline_input)
        ctx.metrics.add("work_units", op=work.op)
        yield
    else:
        base = torch.zeros_like(start) if work.baseline is None else work.baseline.expand_as(start)
    span = (slice(None),) if work.positions is None else (slice(None), work.positions)
    delta = torch.zeros_like(start)
    delta[span] = (start - base)[span]

    def path(alphas: list[float]) -> torch.Tensor:
        """The activation at each point: [len(alphas) * batch, ...]."""
        scale = torch.tensor(alphas, dtype=start.dtype, device=start.device)
        scale = scale.view(-1, *([1] * start.dim()))
        point = start - delta + scale * delta  # base on the span, the input elsewhere
        return point.reshape(-1, *start.shape[1:])

    grads = torch.zeros_like(start, dtype=torch.float32)
    for begin in range(0, len(work.alphas), work.per_forward):
        token.check()
        alphas = work.alphas[begin : begin + work.per_forward]
        copies = len(alphas)
        run = model.hook_run(
            [(hook, _placing(path(alphas)))], names_filter=[hook], capture=True,
            interrupt=token.check, incl_bwd=True,
        )  # fmt: skip
        logits = model.forward(
            tokens.repeat(copies, 1),
            attention_mask=None if mask is None else mask.repeat(copies, 1),
            hooks=run,
        )
        with autograd_on():  # the copies' metrics must be recorded for the backward
            with_batch = logits.view(copies, batch, *logits.shape[1:])
            objective = metric.normalized(metric.of_copies(with_batch)).sum()
        backward_from(objective)
        grad = run.cache.get(f"{hook}_grad")  # none: the metric does not depend on it
        if grad is not None:
            grads += grad.float().view(copies, *start.shape).sum(0)
        ctx.metrics.add("work_units", op=work.op)
        yield
    attributions = delta.float() * grads / len(work.alphas)

    ends = model.forward(
        tokens.repeat(2, 1),
        attention_mask=None if mask is None else mask.repeat(2, 1),
        fwd_hooks=[(hook, _placing(path([1.0, 0.0])))],
        interrupt=token.check,
    )
    ends = ends.view(2, batch, *ends.shape[1:])
    value, baseline_value = (float(v) for v in metric.normalized(metric.of_copies(ends)))
    fields = IntegratedGradientsFields(
        hook=hook, steps=len(work.alphas), value=value, baseline_value=baseline_value,
        convergence_delta=float(attributions.sum()) - (value - baseline_value),
        forwards=work.cost.forwards,
    )  # fmt: skip
    return TensorsResult({IG_ATTRIBUTIONS: attributions.cpu()}, fields.model_dump())


def _placing(points: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A hook function replacing the activation by ``points``."""

    def place(value: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return points.to(value.dtype)

    return place
