"""Activation patching (``POST /v1/patching``): TransformerLens's ``generic_activation_patch``,
batched.

TransformerLens runs one full forward per index row. Each row's result only depends on the
corrupted tokens, the clean activation and the slice patched, so here many rows share a forward:
the corrupted batch is tiled once per row ("copy"), and the hook patches each copy's own slice.
Rows are grouped by layer, and each group starts at that layer from the corrupted run's
``resid_pre`` (everything before the patched layer is the unpatched corrupted run), and only the
positions the metric reads go through the final norm and unembedding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from hooklab_proto import (
    PATCH_ACTIVATIONS,
    PATCHING_LOGITS,
    PATCHING_METRIC,
    ErrorCode,
    PatchAxis,
    PatchingFields,
    PatchingRequest,
    PatchMetric,
)
from hooklab_server.engine import HookedTransformer, HookPoint
from hooklab_server.engine.catalogue import act_names, axis_sizes, hook_shape
from hooklab_server.engine.hook_points import NO_HOOKS

from ..auth import Account
from .attribution import attribution_steps
from .cancel import CancelToken
from .context import OpsContext
from .cost import Cost, backward_bytes, check_response, response_size, with_slack
from .errors import QuotaExceeded, RequestError, too_large
from .inputs import TokenBatch, token_batch
from .metrics import Metric
from .run import TensorsResult

Index = tuple[int | slice, ...]


@dataclass
class _Plan:
    """The validated sweep: which hook per layer, how each row maps onto the activation."""

    template: str  # the hook name, with {layer}
    activation: str
    axes: list[PatchAxis]
    ranges: list[int]
    rows: list[tuple[int, ...]]
    shape: list[int]  # the result's shape (flat when the rows were explicit)
    axis_of: dict[str, int]  # index axis -> activation axis

    def hook(self, layer: int) -> str:
        return self.template.format(layer=layer)

    def selection(self, row: tuple[int, ...]) -> Index:
        """The activation slice one row patches, batch axis first (TransformerLens's setters)."""
        named = zip(self.axes[1:], row[1:], strict=True)
        picks = {self.axis_of[axis]: value for axis, value in named}
        depth = max(picks, default=0)
        return tuple(picks.get(axis, slice(None)) for axis in range(depth + 1))


def _plan(model: HookedTransformer, request: PatchingRequest, pos: int, max_rows: int) -> _Plan:
    cfg = model.cfg
    patchable = act_names(cfg)  # the hook catalogue's short names for this architecture
    if request.activation not in patchable:
        known = request.activation in PATCH_ACTIVATIONS
        raise RequestError(
            ErrorCode.UNKNOWN_HOOK if known else ErrorCode.VALIDATION,
            f"this model has no activation {request.activation!r} to patch"
            if known
            else f"cannot patch activation {request.activation!r}",
            f"one of: {', '.join(patchable)}",
        )
    template = patchable[request.activation]
    first = template.format(layer=0)
    shape = hook_shape(first, cfg)
    sizes = axis_sizes(cfg, 1, pos)
    if shape[1] == "head":  # attention scores / pattern: [batch, head, dest_pos, src_pos]
        axis_of = {"head": 1, "head_index": 1, "dest_pos": 2, "src_pos": 3}
    elif len(shape) > 2 and shape[2] in ("head", "kv_head"):  # [batch, pos, head, …]
        axis_of = {"pos": 1, "head": 2, "head_index": 2}
    else:  # [batch, pos, …]
        axis_of = {"pos": 1}
    axes = list(request.axes)
    for axis in axes[1:]:
        if axis not in axis_of:
            raise RequestError(
                ErrorCode.VALIDATION,
                f"axis {axis!r} does not index {request.activation} {list(shape)}",
                f"its axes: layer, {', '.join(axis_of)}",
            )
    if len({axis_of[axis] for axis in axes[1:]}) != len(axes) - 1:
        raise RequestError(ErrorCode.VALIDATION, f"axes {axes} name one activation axis twice")
    ranges = [cfg.n_layers] + [sizes[shape[axis_of[axis]]] for axis in axes[1:]]
    if request.index is None:
        count = 1
        for size in ranges:
            count *= size
        if count > max_rows:
            raise too_large(
                "index rows (every combination of the axes)", count, max_rows,
                "max_patching_rows", "fix some axes with explicit 'index' rows, or split the sweep",
            )  # fmt: skip
        rows = list(itertools.product(*(range(size) for size in ranges)))
        return _Plan(template, request.activation, axes, ranges, rows, ranges, axis_of)
    rows = []
    for row in request.index:
        if len(row) != len(axes):
            raise RequestError(
                ErrorCode.BAD_SHAPE, f"index row {row} needs one value per axis {axes}"
            )
        for value, size, axis in zip(row, ranges, axes, strict=True):
            if not -size <= value < size:
                raise RequestError(
                    ErrorCode.BAD_INDEX, f"{axis}={value} is outside 0..{size - 1} in row {row}"
                )
        rows.append(tuple(value % size for value, size in zip(row, ranges, strict=True)))
    return _Plan(template, request.activation, axes, ranges, rows, [len(rows)], axis_of)


@dataclass
class PatchingWork:
    """A validated sweep: inputs resolved, plan and chunking fixed, cost known."""

    corrupted: TokenBatch
    clean_tokens: TokenBatch | None  # run on the server; else clean_activations holds the values
    clean_activations: dict[int, torch.Tensor]  # layer -> clean activation
    clean_start: torch.Tensor | None  # clean blocks.0.hook_resid_pre, for normalize baselines
    plan: _Plan
    metric: Metric
    layers: list[int]
    per_forward: int
    request: PatchingRequest
    cost: Cost
    caller: Account
    wants_json: bool
    op: str = "patching"


def validate_patching(ctx: OpsContext, request: PatchingRequest, wants_json: bool) -> PatchingWork:
    model, cfg, settings = ctx.model, ctx.model.cfg, ctx.settings
    corrupted = token_batch(ctx, request.corrupted, "corrupted", request.prepend_bos, None)
    batch, pos = corrupted.batch, corrupted.pos
    plan = _plan(model, request, pos, settings.max_patching_rows)
    metric = Metric(request.metric, corrupted.tokens, cfg.d_vocab_out)
    if request.metric.graph is not None:
        metric.compile(ctx, request.metric.graph, *corrupted.tokens.shape)
    layers = sorted({row[0] for row in plan.rows})
    clean_tokens, clean_activations, clean_start = None, {}, None
    if request.clean is not None:
        clean_tokens = token_batch(ctx, request.clean, "clean", request.prepend_bos, None)
        if clean_tokens.tokens.shape != corrupted.tokens.shape:
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"clean tokens {list(clean_tokens.tokens.shape)} and corrupted tokens "
                f"{list(corrupted.tokens.shape)} differ in shape",
                "clean and corrupted inputs need the same batch and length",
            )
    else:
        clean_activations = _clean_activations(ctx, request, plan, layers, batch, pos)
        clean_start = _clean_start(ctx, request)
    if (
        request.metric.normalize
        and request.metric.baselines is None
        and clean_tokens is None
        and clean_start is None
    ):
        raise RequestError(
            ErrorCode.VALIDATION,
            "normalize without 'baselines' needs the clean logits: send 'clean' tokens, or a "
            "clean source holding 'blocks.0.hook_resid_pre'",
            "or pass baselines=[clean_value, corrupted_value]",
        )

    if request.method == "attribution":
        if request.metric.kind == "logits":
            raise RequestError(
                ErrorCode.VALIDATION,
                "attribution patching differentiates the metric: kind 'logits' is not one",
                "use a metric (logit_diff, logit, prob, logprob, loss) or a traced graph",
            )
        # One forward and backward: no patched forwards, the backward's memory instead.
        per_forward, patched_forwards = 1, 0
        working = backward_bytes(model, batch, pos)
    else:
        per_copy = _bytes_per_copy(model, metric, batch, pos)
        budget = max(1, settings.patching_budget_bytes // per_copy)
        per_forward = min(request.patches_per_forward or budget, budget)
        per_forward = max(1, min(per_forward, settings.max_tokens // max(1, batch * pos)))
        by_layer = [sum(1 for row in plan.rows if row[0] == layer) for layer in layers]
        patched_forwards = sum(math.ceil(count / per_forward) for count in by_layer)
        working = per_forward * per_copy
    forwards = 1 + patched_forwards + (clean_tokens is not None)
    forwards += (
        request.metric.normalize and clean_tokens is None and request.metric.baselines is None
    )
    check_sweep_forwards(
        ctx, forwards, f"{len(plan.rows)} rows at {per_forward} patched copies per forward",
        "patch fewer rows per request (explicit 'index' rows)", "or a shorter input",
    )  # fmt: skip
    if request.metric.kind == "logits":
        returned = len(plan.rows) * batch * len(metric.positions) * cfg.d_vocab_out
    else:
        returned = len(plan.rows)
    sent, building = response_size(returned, 4, wants_json)
    check_response(sent, wants_json, settings)
    patched_rows = len(plan.rows) if patched_forwards else 0
    tokens = (forwards - patched_forwards + patched_rows) * batch * pos
    peak = working + building
    behind = with_slack(working) if request.method == "attribution" else 0
    return PatchingWork(
        corrupted, clean_tokens, clean_activations, clean_start, plan, metric, layers,
        per_forward, request, Cost(tokens, forwards, with_slack(peak), sent, behind),
        ctx.caller, wants_json,
    )  # fmt: skip


def check_sweep_forwards(
    ctx: OpsContext, forwards: int, how: str, fewer: str, shorter: str
) -> None:
    """A sweep's forwards against the key's quota and the server's limit (both named
    max_patching_forwards), before anything runs."""
    quota = ctx.caller.quotas.get("max_patching_forwards")
    if quota is not None and forwards > quota:
        raise QuotaExceeded(
            "max_patching_forwards",
            f"this sweep takes {forwards} forwards; key {ctx.caller.name!r} may ask for "
            f"{quota} per request (quota max_patching_forwards)",
            fewer,
            retry_after=None,
        )
    limit = ctx.settings.max_patching_forwards
    if forwards > limit:
        raise too_large(
            f"forwards ({how})", forwards, limit, "max_patching_forwards", f"{fewer}, {shorter}"
        )


def _bytes_per_copy(model: HookedTransformer, metric: Metric, batch: int, pos: int) -> int:
    """Activation memory of one patched copy: the widest transients of one block per token,
    plus the logits kept per copy."""
    cfg = model.cfg
    per_token = 6 * cfg.d_model + 2 * (cfg.d_mlp or 4 * cfg.d_model) + 3 * cfg.n_heads * pos
    return batch * (pos * per_token + 2 * len(metric.positions) * cfg.d_vocab_out) * 4


def _clean_activations(
    ctx: OpsContext, request: PatchingRequest, plan: _Plan, layers: list[int], batch: int, pos: int
) -> dict[int, torch.Tensor]:
    """The clean activation per layer from a stored cache or the request, shape-checked."""
    model = ctx.model
    names = {layer: plan.hook(layer) for layer in layers}
    if request.clean_cache is not None:
        found = {name: ctx.cached_activation(request.clean_cache, name) for name in names.values()}
    else:
        given = request.clean_activations or {}
        missing = [name for name in names.values() if name not in given]
        if missing:
            raise RequestError(ErrorCode.VALIDATION, f"clean_activations lacks {missing[0]!r}")
        found = {name: ctx.finite_tensor(given[name], f"clean {name}") for name in names.values()}
    sizes = axis_sizes(model.cfg, batch, pos)
    clean = {}
    for layer, name in names.items():
        expected = [sizes[axis] for axis in hook_shape(name, model.cfg)]
        value = found[name]
        if list(value.shape) != expected or not value.is_floating_point():
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"clean {name} is {str(value.dtype).removeprefix('torch.')} "
                f"{list(value.shape)}; the corrupted run's is {expected}",
                "clean and corrupted inputs need the same batch and length",
            )
        clean[layer] = value.to(model.device, model.cfg.dtype)
    return clean


def _clean_start(ctx: OpsContext, request: PatchingRequest) -> torch.Tensor | None:
    """The clean run's residual before any block (embeddings included), when the clean source
    holds it: enough to rerun the clean logits for normalize."""
    name = "blocks.0.hook_resid_pre"
    start = None
    if request.clean_cache is not None:
        stored = ctx.store.get("cache", request.clean_cache, ctx.caller).value
        start = stored.get(name) if isinstance(stored, dict) else None
    elif request.clean_activations and name in request.clean_activations:
        start = ctx.finite_tensor(request.clean_activations[name], f"clean {name}")
    return None if start is None else start.to(ctx.model.device, ctx.model.cfg.dtype)


def patching_steps(
    ctx: OpsContext, work: PatchingWork, token: CancelToken
) -> Generator[None, None, TensorsResult]:
    """The sweep one forward at a time: it yields after each, so a scheduler can serve other
    work in between; its return value is the result."""
    if work.request.method == "attribution":
        estimate, fields, base_logits, source_logits = yield from attribution_steps(
            ctx, work, token
        )
        return _metric_result(ctx, work, estimate, fields, base_logits, source_logits, token)
    model, request, plan, metric = ctx.model, work.request, work.plan, work.metric
    tokens, mask = work.corrupted.tokens, work.corrupted.mask

    def between_layers() -> None:
        token.check()

    clean, clean_logits = work.clean_activations, None
    if work.clean_tokens is not None:
        names = {layer: plan.hook(layer) for layer in work.layers}
        clean_logits, found = model.run_with_cache(
            work.clean_tokens.tokens, names_filter=list(names.values()),
            attention_mask=work.clean_tokens.mask, interrupt=between_layers,
        )  # fmt: skip
        clean = {layer: found[name] for layer, name in names.items()}
        ctx.metrics.add("work_units", op=work.op)
        yield

    # The unpatched corrupted run: each layer's starting residual, and the baseline.
    starts = [f"blocks.{layer}.hook_resid_pre" for layer in work.layers]
    corrupted_logits, cache = model.run_with_cache(
        tokens, names_filter=starts, attention_mask=mask, interrupt=between_layers
    )
    ctx.metrics.add("work_units", op=work.op)
    metric.filler = corrupted_logits
    yield
    forwards = 1 + (work.clean_tokens is not None)
    values: list[torch.Tensor | None] = [None] * len(plan.rows)
    for layer in work.layers:
        members = [i for i, row in enumerate(plan.rows) if row[0] == layer]
        for begin in range(0, len(members), work.per_forward):
            token.check()
            chunk = members[begin : begin + work.per_forward]
            logits = _patched_logits(
                model, plan, layer, [plan.rows[i] for i in chunk], clean[layer],
                cache[f"blocks.{layer}.hook_resid_pre"], mask, metric.positions, between_layers,
            )  # fmt: skip
            forwards += 1
            ctx.metrics.add("work_units", op=work.op)
            result = logits if request.metric.kind == "logits" else metric(logits)
            for slot, i in enumerate(chunk):
                values[i] = result[slot]
            yield
    fields = PatchingFields(
        shape=plan.shape, axes=plan.axes, rows=len(plan.rows), forwards=forwards,
        copies_per_forward=work.per_forward,
    )  # fmt: skip
    stacked = torch.stack(values)  # type: ignore[arg-type]
    if request.metric.kind == "logits":
        fields.positions = metric.positions
        return TensorsResult({PATCHING_LOGITS: stacked}, fields.model_dump(exclude_none=True))
    return _metric_result(ctx, work, stacked, fields, corrupted_logits, clean_logits, token)


def _metric_result(
    ctx: OpsContext,
    work: PatchingWork,
    values: torch.Tensor,
    fields: PatchingFields,
    corrupted_logits: torch.Tensor,
    clean_logits: torch.Tensor | None,
    token: CancelToken,
) -> TensorsResult:
    """The metric per row shaped as the sweep, normalized when asked (measuring the baselines
    if needed)."""
    spec = work.request.metric
    if spec.normalize:
        if clean_logits is None and spec.baselines is None:
            assert work.clean_start is not None  # validated
            clean_logits = ctx.model.forward(
                work.clean_start, start_at_layer=0, attention_mask=work.corrupted.mask,
                interrupt=token.check,
            )  # fmt: skip
            fields.forwards += 1
        clean_value, corrupted_value = _baselines(spec, work.metric, clean_logits, corrupted_logits)
        fields.baselines = [clean_value, corrupted_value]
        values = (values - corrupted_value) / (clean_value - corrupted_value)
    # Shaped as the index axes (flat for explicit rows), as TransformerLens returns it.
    metric = values.float().cpu().reshape(fields.shape)
    return TensorsResult({PATCHING_METRIC: metric}, fields.model_dump(exclude_none=True))


def _baselines(
    spec: PatchMetric,
    metric: Metric,
    clean_logits: torch.Tensor | None,
    corrupted_logits: torch.Tensor,
) -> tuple[float, float]:
    if spec.baselines is not None:
        clean_value, corrupted_value = spec.baselines
    else:
        assert clean_logits is not None
        clean_value = float(metric(clean_logits[None][:, :, metric.positions]))
        corrupted_value = float(metric(corrupted_logits[None][:, :, metric.positions]))
    if clean_value == corrupted_value:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"normalize: the clean and corrupted metrics are equal ({clean_value})",
        )
    return clean_value, corrupted_value


def _patched_logits(
    model: HookedTransformer,
    plan: _Plan,
    layer: int,
    rows: list[tuple[int, ...]],
    clean: torch.Tensor,
    start: torch.Tensor,
    mask: torch.Tensor | None,
    positions: list[int],
    interrupt: Callable[[], None],
) -> torch.Tensor:
    """Logits [copies, batch, positions, d_vocab] with copy i patched at ``rows[i]``."""
    copies, batch = len(rows), start.shape[0]
    selections = [(slice(None), *plan.selection(row)[1:]) for row in rows]

    def patch(value: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        # A fresh tensor: the engine may hand out a view of a larger one.
        patched = value.clone(memory_format=torch.contiguous_format)
        per_copy = patched.view(copies, batch, *patched.shape[1:])
        for i, selection in enumerate(selections):
            per_copy[i][selection] = clean[selection]
        return patched

    resid = model.forward(
        start.repeat(copies, *([1] * (start.dim() - 1))),
        start_at_layer=layer,
        stop_at_layer=model.cfg.n_layers,
        attention_mask=None if mask is None else mask.repeat(copies, 1),
        fwd_hooks=[(plan.hook(layer), patch)],
        interrupt=interrupt,
    )  # [copies * batch, pos, d_model]
    resid = resid[:, positions]
    with torch.inference_mode():
        logits = model.unembed(model.ln_final(resid, NO_HOOKS), NO_HOOKS)
    return logits.view(copies, batch, len(positions), -1)
