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
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import (
    PATCH_ACTIVATIONS,
    PATCHING_LOGITS,
    PATCHING_METRIC,
    ErrorCode,
    ForwardRequest,
    PatchingRequest,
    PatchMetric,
)
from hooklab_server.engine import HookedTransformer, HookPoint, lm_cross_entropy_loss
from hooklab_server.engine.hook_points import NO_HOOKS
from hooklab_server.engine.shapes import axis_sizes, hook_shape

from .errors import RequestError
from .run import Runner

# Activation memory one forward may use for its patched copies, when the request sets no cap.
BUDGET_BYTES = 512 * 2**20
MAX_ROWS = 1_000_000

Index = tuple[int | slice, ...]


@dataclass
class PatchingResult:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass
class _Plan:
    """The validated sweep: which hook per layer, how each row maps onto the activation."""

    activation: str
    axes: list[str]
    ranges: list[int]
    rows: list[tuple[int, ...]]
    shape: list[int]  # the result's shape (flat when the rows were explicit)
    axis_of: dict[str, int]  # index axis -> activation axis

    def hook(self, layer: int) -> str:
        return PATCH_ACTIVATIONS[self.activation].format(layer=layer)

    def selection(self, row: tuple[int, ...]) -> Index:
        """The activation slice one row patches, batch axis first (TransformerLens's setters)."""
        named = zip(self.axes[1:], row[1:], strict=True)
        picks = {self.axis_of[axis]: value for axis, value in named}
        depth = max(picks, default=0)
        return tuple(picks.get(axis, slice(None)) for axis in range(depth + 1))


def _plan(model: HookedTransformer, request: PatchingRequest, pos: int) -> _Plan:
    cfg = model.cfg
    if request.activation not in PATCH_ACTIVATIONS:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"cannot patch activation {request.activation!r}",
            f"one of: {', '.join(PATCH_ACTIVATIONS)}",
        )
    first = PATCH_ACTIVATIONS[request.activation].format(layer=0)
    if first not in model.hook_names:
        raise RequestError(
            ErrorCode.UNKNOWN_HOOK, f"this model has no {first!r} ({request.activation})"
        )
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
        if count > MAX_ROWS:
            raise RequestError(ErrorCode.TOO_LARGE, f"{count} index rows exceed {MAX_ROWS}")
        rows = list(itertools.product(*(range(size) for size in ranges)))
        return _Plan(request.activation, axes, ranges, rows, ranges, axis_of)
    if len(request.index) > MAX_ROWS:
        raise RequestError(ErrorCode.TOO_LARGE, f"{len(request.index)} rows exceed {MAX_ROWS}")
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
    return _Plan(request.activation, axes, ranges, rows, [len(rows)], axis_of)


class _Metric:
    """A declarative metric over logits at a few positions, vectorised over patched copies."""

    def __init__(self, spec: PatchMetric, tokens: torch.Tensor, d_vocab: int) -> None:
        self.spec = spec
        self.tokens = tokens
        batch, pos = tokens.shape
        if spec.kind == "loss":
            self.positions = list(range(pos))
            return
        if spec.kind == "logits":
            wanted = spec.positions if spec.positions is not None else list(range(pos))
            self.positions = [_position(p, pos) for p in wanted]
            return
        read = [_position(p, pos) for p in _per_row(spec.pos, batch, "pos")]
        self.positions = sorted(set(read))
        self.rows = torch.arange(batch)
        self.slot = torch.tensor([self.positions.index(p) for p in read])
        self.answer = _token_ids(spec.answer, batch, d_vocab, "answer")
        self.wrong = None
        if spec.wrong is not None:
            self.wrong = _token_ids(spec.wrong, batch, d_vocab, "wrong")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[copies, batch, positions, d_vocab] -> [copies]."""
        spec, logits = self.spec, logits.float()
        if spec.kind == "loss":
            tokens = self.tokens.to(logits.device)
            return torch.stack([lm_cross_entropy_loss(copy, tokens) for copy in logits])
        at = logits[:, self.rows, self.slot]  # [copies, batch, d_vocab]
        if spec.kind == "prob":
            at = at.softmax(-1)
        elif spec.kind == "logprob":
            at = at.log_softmax(-1)
        value = at[:, self.rows, self.answer]
        if spec.kind == "logit_diff":
            value = value - at[:, self.rows, self.wrong]
        return value.mean(-1) if spec.reduce == "mean" else value.sum(-1)


def _position(value: int, pos: int) -> int:
    if not -pos <= value < pos:
        raise RequestError(ErrorCode.BAD_INDEX, f"position {value} is outside 0..{pos - 1}")
    return value % pos


def _per_row(value: int | list[int], batch: int, what: str) -> list[int]:
    values = [value] * batch if isinstance(value, int) else list(value)
    if len(values) != batch:
        raise RequestError(
            ErrorCode.BAD_SHAPE, f"metric {what} has {len(values)} values for a batch of {batch}"
        )
    return values


def _token_ids(value: int | list[int] | None, batch: int, d_vocab: int, what: str) -> torch.Tensor:
    ids = _per_row(value if value is not None else 0, batch, what)
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise RequestError(
            ErrorCode.BAD_INDEX, f"metric {what} token {bad[0]} is outside 0..{d_vocab - 1}"
        )
    return torch.tensor(ids)


class Patcher:
    """Runs patching sweeps on the shared, read-only model of a :class:`Runner`."""

    def __init__(self, runner: Runner, budget_bytes: int = BUDGET_BYTES) -> None:
        self.runner = runner
        self.model = runner.model
        self.budget_bytes = budget_bytes

    def run(self, request: PatchingRequest) -> PatchingResult:
        with torch.inference_mode():
            return self._run(request)

    def _run(self, request: PatchingRequest) -> PatchingResult:
        model, cfg = self.model, self.model.cfg
        corrupted = self.runner.prepare(
            ForwardRequest(input=request.corrupted, prepend_bos=request.prepend_bos)
        )
        tokens, mask = corrupted.input, corrupted.attention_mask
        batch, pos = tokens.shape
        plan = _plan(model, request, pos)
        metric = _Metric(request.metric, tokens, cfg.d_vocab_out)
        if request.metric.kind == "logits":
            size = len(plan.rows) * batch * len(metric.positions) * cfg.d_vocab_out * 4
            if size > self.runner.settings.max_response_bytes:
                raise RequestError(
                    ErrorCode.TOO_LARGE,
                    f"the logits of {len(plan.rows)} patches would be {size} bytes, over the "
                    f"limit of {self.runner.settings.max_response_bytes}",
                    "send fewer index rows per request, or fewer positions",
                    status=413,
                )
        layers = sorted({row[0] for row in plan.rows})
        clean, clean_logits = self._clean(request, plan, layers, batch, pos)

        # The unpatched corrupted run: each layer's starting residual, and the baseline.
        starts = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
        corrupted_logits, cache = model.run_with_cache(
            tokens, names_filter=starts, attention_mask=mask
        )
        forwards = 1 + (request.clean is not None)
        values: list[torch.Tensor | None] = [None] * len(plan.rows)
        per_forward = self._copies_per_forward(request, metric, batch, pos)
        for layer in layers:
            members = [i for i, row in enumerate(plan.rows) if row[0] == layer]
            for begin in range(0, len(members), per_forward):
                chunk = members[begin : begin + per_forward]
                logits = self._patched_logits(
                    plan, layer, [plan.rows[i] for i in chunk], clean[layer],
                    cache[f"blocks.{layer}.hook_resid_pre"], mask, metric.positions,
                )  # fmt: skip
                forwards += 1
                result = logits if request.metric.kind == "logits" else metric(logits)
                for slot, i in enumerate(chunk):
                    values[i] = result[slot]
        meta: dict[str, Any] = {
            "shape": plan.shape,
            "axes": plan.axes,
            "rows": len(plan.rows),
            "forwards": forwards,
            "copies_per_forward": per_forward,
        }
        stacked = torch.stack(values)  # type: ignore[arg-type]
        if request.metric.kind == "logits":
            meta["positions"] = metric.positions
            return PatchingResult({PATCHING_LOGITS: stacked}, meta)
        if request.metric.normalize:
            if clean_logits is None and request.metric.baselines is None:
                clean_logits = self._clean_logits_from_start(request, mask)
                forwards += 1
            clean_value, corrupted_value = self._baselines(
                request.metric, metric, clean_logits, corrupted_logits
            )
            meta["baselines"] = [clean_value, corrupted_value]
            stacked = (stacked - corrupted_value) / (clean_value - corrupted_value)
        return PatchingResult({PATCHING_METRIC: stacked.float().cpu()}, meta)

    # --- clean activations ----------------------------------------------------------------

    def _clean(
        self, request: PatchingRequest, plan: _Plan, layers: list[int], batch: int, pos: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """The clean activation per layer (shape-checked), and clean logits when known."""
        model, runner = self.model, self.runner
        names = {layer: plan.hook(layer) for layer in layers}
        clean_logits = None
        if request.clean is not None:
            prepared = runner.prepare(
                ForwardRequest(input=request.clean, prepend_bos=request.prepend_bos)
            )
            clean_logits, found = model.run_with_cache(
                prepared.input,
                names_filter=list(names.values()),
                attention_mask=prepared.attention_mask,
            )
        elif request.clean_cache is not None:
            found = {
                name: runner.cached_activation(request.clean_cache, name) for name in names.values()
            }
        else:
            given = request.clean_activations or {}
            missing = [name for name in names.values() if name not in given]
            if missing:
                raise RequestError(ErrorCode.VALIDATION, f"clean_activations lacks {missing[0]!r}")
            found = {name: runner.tensor(given[name]) for name in names.values()}
        sizes = axis_sizes(model.cfg, batch, pos)
        clean = {}
        for layer, name in names.items():
            expected = [sizes[axis] for axis in hook_shape(name, model.cfg)]
            value = found[name]
            if list(value.shape) != expected or not value.is_floating_point():
                raise RequestError(
                    ErrorCode.BAD_SHAPE,
                    f"clean {name} is {value.dtype} {list(value.shape)}; the corrupted run's is "
                    f"{expected}",
                    "clean and corrupted inputs need the same batch and length",
                )
            clean[layer] = value.to(model.device, model.cfg.dtype)
        return clean, clean_logits

    def _baselines(
        self,
        spec: PatchMetric,
        metric: _Metric,
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

    def _clean_logits_from_start(
        self, request: PatchingRequest, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The clean run's logits, rerun from its ``blocks.0.hook_resid_pre`` (the residual
        before any block, embeddings included) when the clean source holds it."""
        name = "blocks.0.hook_resid_pre"
        start = None
        if request.clean_cache is not None:
            stored = self.runner.store.get("cache", request.clean_cache).value
            start = stored.get(name) if isinstance(stored, dict) else None
        elif request.clean_activations and name in request.clean_activations:
            start = self.runner.tensor(request.clean_activations[name])
        if start is None:
            raise RequestError(
                ErrorCode.VALIDATION,
                f"normalize without 'baselines' needs the clean logits: send 'clean' tokens, or "
                f"a clean source holding {name!r}",
                "or pass baselines=(clean_value, corrupted_value)",
            )
        start = start.to(self.model.device, self.model.cfg.dtype)
        return self.model.forward(start, start_at_layer=0, attention_mask=mask)

    # --- the batched patched forwards -----------------------------------------------------

    def _copies_per_forward(
        self, request: PatchingRequest, metric: _Metric, batch: int, pos: int
    ) -> int:
        if request.patches_per_forward is not None:
            return request.patches_per_forward
        cfg = self.model.cfg
        # The widest transients of one block per token, plus the logits kept per copy.
        per_token = 6 * cfg.d_model + 2 * (cfg.d_mlp or 4 * cfg.d_model) + 3 * cfg.n_heads * pos
        per_copy = batch * (pos * per_token + 2 * len(metric.positions) * cfg.d_vocab_out) * 4
        limit = max(1, self.runner.settings.max_tokens // max(1, batch * pos))
        return max(1, min(self.budget_bytes // per_copy, limit))

    def _patched_logits(
        self,
        plan: _Plan,
        layer: int,
        rows: list[tuple[int, ...]],
        clean: torch.Tensor,
        start: torch.Tensor,
        mask: torch.Tensor | None,
        positions: list[int],
    ) -> torch.Tensor:
        """Logits [copies, batch, positions, d_vocab] with copy i patched at ``rows[i]``."""
        model = self.model
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
        )  # [copies * batch, pos, d_model]
        resid = resid[:, positions]
        logits = model.unembed(model.ln_final(resid, NO_HOOKS), NO_HOOKS)
        return logits.view(copies, batch, len(positions), -1)
