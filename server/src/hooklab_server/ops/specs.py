"""Compile declarative hook specs into hook functions, validating everything first.

A spec is checked against each hook point it names — the hook exists, its selectors fit the
activation's axes and sizes, its tensors have the right shape — before any forward runs, so a
bad request fails fast with a message saying what was expected.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import (
    REPLACING_OPS,
    AblateSpec,
    BatchSource,
    CacheSource,
    CallbackSpec,
    ClampSpec,
    DeclarativeSpec,
    ErrorCode,
    FeatureAblateSpec,
    FeatureClampSpec,
    FeatureSpec,
    FeatureSteerSpec,
    GraphSpec,
    HookSpec,
    PatchSpec,
    ProjectOutSpec,
    ScaleSpec,
    SetSpec,
    SteerSpec,
    TensorValue,
)
from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.hook_points import hook_name_advice
from hooklab_server.engine.shapes import axis_sizes, fires_by_default, hook_shape

from .context import OpsContext
from .errors import RequestError, too_large
from .functions import FunctionBudget, compile_function

HookFn = Callable[..., torch.Tensor | None]

_SELECTOR_AXES = {"batch": ("batch",), "pos": ("pos",), "head": ("head", "kv_head")}


def is_pattern(name: str) -> bool:
    return any(char in name for char in "*?[")


def resolve_hook_names(
    pattern: str, hook_names: Sequence[str], firing: Sequence[str] | None = None
) -> list[str]:
    """Hook names matching an exact name or a glob; RequestError (with suggestions) if none.

    A glob expands over ``firing`` (the hook points that fire by default), as a predicate does
    in TransformerLens; an exact name may also name a conditional hook point, which then fires.
    """
    if is_pattern(pattern):
        matched = fnmatch.filter(hook_names if firing is None else firing, pattern)
        if not matched:
            raise RequestError(
                ErrorCode.UNKNOWN_HOOK,
                f"pattern {pattern!r} matches no hook point",
                "patterns use shell globs, e.g. 'blocks.*.hook_resid_post'",
            )
        return matched
    if pattern not in hook_names:
        raise RequestError(
            ErrorCode.UNKNOWN_HOOK,
            f"unknown hook point {pattern!r}",
            hook_name_advice(pattern, hook_names) or "GET /v1/model lists the hook points",
        )
    return [pattern]


@dataclass
class _Target:
    """One hook point a spec applies to: its axes, the shape validated against, and the
    selected indices per axis (absent axes: everything)."""

    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    chosen: dict[int, list[int]]  # axis position -> selected indices

    def mesh(self, shape: torch.Size | tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
        """Open-mesh index of the selection in an activation of ``shape`` (None = all of it).
        Built per call, because during generation the position axes grow step by step."""
        if not self.chosen:
            return None
        mesh = []
        for position, size in enumerate(shape):
            ids = torch.tensor(self.chosen.get(position, range(size)), dtype=torch.long)
            view = [1] * len(shape)
            view[position] = -1
            mesh.append(ids.view(view))
        return tuple(mesh)

    def axis(self, *names: str) -> int | None:
        return next((i for i, axis in enumerate(self.axes) if axis in names), None)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        index = self.mesh(x.shape)
        return x if index is None else x[index]

    @property
    def selection_shape(self) -> tuple[int, ...]:
        return tuple(
            len(self.chosen[axis]) if axis in self.chosen else size
            for axis, size in enumerate(self.shape)
        )

    def overlaps(self, other: _Target) -> bool:
        """Whether two selections on the same hook point share an element."""
        return all(
            not set(self.chosen[axis]).isdisjoint(other.chosen[axis])
            for axis in self.chosen.keys() & other.chosen.keys()
        )


def _indices(value: int | list[int] | None) -> list[int] | None:
    if value is None:
        return None
    return [value] if isinstance(value, int) else list(value)


def _first_repeat(values: list[int]) -> int | None:
    seen: set[int] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _target(
    spec: DeclarativeSpec, name: str, model: HookedTransformer, batch: int, pos: int
) -> _Target:
    axes = hook_shape(name, model.cfg)
    sizes = axis_sizes(model.cfg, batch, pos)
    shape = tuple(sizes[axis] for axis in axes)
    chosen: dict[int, list[int]] = {}
    selectors = {
        "batch": (_indices(spec.batch), _SELECTOR_AXES["batch"]),
        "pos": (_indices(spec.pos), _SELECTOR_AXES["pos"]),
        "head": (_indices(spec.head), _SELECTOR_AXES["head"]),
        "neuron": (_indices(spec.neuron), (axes[-1],)),
    }
    for selector, (indices, wanted_axes) in selectors.items():
        if indices is None:
            continue
        position = next((i for i, axis in enumerate(axes) if axis in wanted_axes), None)
        if position is None:
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"hook point {name!r} has no {selector} axis (its axes are {list(axes)})",
            )
        size = shape[position]
        if not indices:
            raise RequestError(ErrorCode.BAD_INDEX, f"{selector} selector on {name!r} is empty")
        bad = [index for index in indices if not -size <= index < size]
        if bad:
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"{selector} index {bad[0]} is out of range for {name!r}: "
                f"axis {axes[position]!r} has size {size}",
                f"valid indices are {-size}..{size - 1}",
            )
        normalised = [index % size for index in indices]
        repeated = _first_repeat(normalised)
        if repeated is not None:
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"{selector} selector on {name!r} repeats index {repeated} (negative indices "
                "count from the end)",
                "list each index once",
            )
        chosen[position] = normalised
    return _Target(name, axes, shape, chosen)


def _expect_shape(
    tensor: torch.Tensor, allowed: list[tuple[int, ...]], what: str, name: str
) -> None:
    if tuple(tensor.shape) not in allowed:
        expected = " or ".join(str(list(shape)) for shape in dict.fromkeys(allowed))
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"{what} for {name!r} has shape {list(tensor.shape)}; expected {expected}",
        )


class _Edit:
    """A compiled spec at one hook point: ``values(x)`` gives the replacement, either for the
    whole activation (then indexed by the selection) or already shaped like the selection."""

    def __init__(
        self, target: _Target, values: Callable[[torch.Tensor], torch.Tensor], selected: bool
    ):
        self.target = target
        self.values = values
        self.selected = selected  # values() returns the selection, not the whole activation

    def __call__(self, x: torch.Tensor, hook: object = None) -> torch.Tensor:
        index = self.target.mesh(x.shape)
        new = self.values(x)
        if index is None:
            return new.expand_as(x).to(x.dtype) if self.selected else new.to(x.dtype)
        out = x.clone()
        out[index] = (new if self.selected else new[index]).to(x.dtype)
        return out


# --- one compiler per op --------------------------------------------------------------------


@dataclass
class _Compiling:
    """What every op compiler gets: the spec, its target, and the request's resources."""

    spec: Any  # the HookSpec subclass the table dispatched on
    target: _Target
    ctx: OpsContext

    @property
    def name(self) -> str:
        return self.target.name

    def tensor(self, value: TensorValue, what: str) -> torch.Tensor:
        return self.ctx.finite_tensor(value, f"{what} of the spec on {self.name!r}")


def _ablate(c: _Compiling) -> _Edit:
    spec, target = c.spec, c.target
    if spec.mode == "zero":
        return _Edit(target, torch.zeros_like, selected=False)
    if spec.mode == "mean":
        axis = 0 if spec.mean_over == "batch" else target.axis("pos")
        if axis is None:
            raise RequestError(ErrorCode.VALIDATION, f"{c.name!r} has no pos axis to average over")
        return _Edit(target, lambda x: x.mean(axis, keepdim=True).expand_as(x), selected=False)
    size = target.shape[0]
    rows = spec.source_batch or [(row + 1) % size for row in range(size)]
    if len(rows) != size or any(not 0 <= row < size for row in rows):
        raise RequestError(
            ErrorCode.BAD_INDEX,
            f"source_batch must list {size} rows in 0..{size - 1}, got {rows}",
        )
    order = torch.tensor(rows)
    return _Edit(target, lambda x: x[order.to(x.device)], selected=False)


def _patch(c: _Compiling) -> _Edit:
    source, target, shape = c.spec.source, c.target, c.target.shape
    if isinstance(source, BatchSource):
        if not source.batch < shape[0]:
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"patch source batch {source.batch} is out of range (batch size {shape[0]})",
            )
        row = source.batch
        return _Edit(target, lambda x: x[row : row + 1].expand_as(x), selected=False)
    if isinstance(source, CacheSource):
        cached = c.ctx.cached_activation(source.cache, c.name)
        _expect_shape(cached, [shape, (1, *shape[1:])], "cached activation", c.name)
        return _Edit(target, lambda x: cached.to(x.device, x.dtype).expand_as(x), selected=False)
    tensor = c.tensor(source.tensor, "patch tensor")
    _expect_shape(tensor, [shape, target.selection_shape], "patch tensor", c.name)
    full = tuple(tensor.shape) == shape and shape != target.selection_shape
    return _Edit(target, lambda x: tensor.to(x.device, x.dtype), selected=not full)


def _steer(c: _Compiling) -> _Edit:
    spec, target = c.spec, c.target
    vector = c.tensor(spec.vector, "steering vector")
    _expect_shape(vector, [(target.shape[-1],), target.selection_shape], "steering vector", c.name)
    scaled = vector.float() * spec.coeff
    if tuple(vector.shape) == (target.shape[-1],):
        return _Edit(target, lambda x: x + scaled.to(x.device, x.dtype), selected=False)
    return _Edit(target, lambda x: target.select(x) + scaled.to(x.device, x.dtype), selected=True)


def _scale(c: _Compiling) -> _Edit:
    factor = c.spec.factor
    return _Edit(c.target, lambda x: x * factor, selected=False)


def _clamp(c: _Compiling) -> _Edit:
    low, high = c.spec.min, c.spec.max
    return _Edit(c.target, lambda x: x.clamp(min=low, max=high), selected=False)


def _set(c: _Compiling) -> _Edit:
    target, selection = c.target, c.target.selection_shape
    if isinstance(c.spec.value, float | int):
        value = float(c.spec.value)
        return _Edit(target, lambda x: torch.full_like(x, value), selected=False)
    tensor = c.tensor(c.spec.value, "set value")
    try:
        if torch.broadcast_shapes(tuple(tensor.shape), selection) != torch.Size(selection):
            raise RuntimeError
    except RuntimeError:
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"set value of shape {list(tensor.shape)} does not broadcast to the selection "
            f"{list(selection)} of {c.name!r}",
        ) from None
    return _Edit(
        target,
        lambda x: tensor.to(x.device, x.dtype).expand(target.select(x).shape),
        selected=True,
    )


def _project_out(c: _Compiling) -> _Edit:
    direction = c.tensor(c.spec.direction, "direction")
    _expect_shape(direction, [(c.target.shape[-1],)], "direction", c.name)
    norm = direction.double().norm()
    if norm == 0 or not torch.isfinite(norm):
        raise RequestError(
            ErrorCode.VALIDATION, "project_out direction must be non-zero and finite"
        )
    unit = (direction.double() / norm).float()

    def project(x: torch.Tensor) -> torch.Tensor:
        d = unit.to(x.device, x.dtype)
        return x - (x @ d).unsqueeze(-1) * d

    return _Edit(c.target, project, selected=False)


_COMPILERS: dict[type, Callable[[_Compiling], _Edit]] = {
    AblateSpec: _ablate,
    PatchSpec: _patch,
    SteerSpec: _steer,
    ScaleSpec: _scale,
    ClampSpec: _clamp,
    SetSpec: _set,
    ProjectOutSpec: _project_out,
}


def _check_for_generation(spec: DeclarativeSpec | FeatureSpec, ctx: OpsContext) -> None:
    """During generation each step sees new positions, so only position-free specs apply."""
    if spec.pos is not None:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"hook spec on {spec.hook!r}: 'pos' selectors are not supported during generation",
            "drop 'pos' to apply the spec at every position of every step",
        )
    if isinstance(spec, PatchSpec) and not isinstance(spec.source, BatchSource):
        raise RequestError(
            ErrorCode.VALIDATION,
            "during generation 'patch' can only copy another prompt of the batch (source.batch)",
        )
    for field in ("vector", "direction"):
        value = getattr(spec, field, None)
        if value is not None and ctx.tensor(value, field).dim() != 1:
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"hook spec on {spec.hook!r}: during generation vectors must be 1-D "
                "(the activation's last axis)",
            )
    value = getattr(spec, "value", None)
    if (
        value is not None
        and not isinstance(value, float | int)
        and ctx.tensor(value, "value").dim() > 1
    ):
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"hook spec on {spec.hook!r}: during generation a set value must be a number or 1-D",
        )


def expand_specs(
    specs: Sequence[HookSpec], model: HookedTransformer, limit: int
) -> list[tuple[int, HookSpec, str]]:
    """(spec number, spec, hook name) for every hook point each spec applies to, globs
    expanded; refused (413) when there are more than ``limit`` pairs."""
    firing = [name for name in model.hook_names if fires_by_default(name, model.cfg)]
    pairs = [
        (number, spec, name)
        for number, spec in enumerate(specs)
        for name in resolve_hook_names(spec.hook, model.hook_names, firing)
    ]
    if len(pairs) > limit:
        raise too_large(
            "hook applications (each spec times the hook points it names)",
            len(pairs),
            limit,
            "max_hook_applications",
            "name fewer hook points, e.g. 'blocks.*.hook_resid_post' rather than '*'",
        )
    return pairs


def compile_specs(
    ctx: OpsContext,
    specs: Sequence[HookSpec],
    batch: int,
    pos: int,
    generation: bool = False,
    field: str = "hooks",
) -> list[tuple[str, HookFn]]:
    """``fwd_hooks`` for the engine, in spec order; raises RequestError on any invalid spec.
    (Backward hook specs compile the same way: a gradient has its activation's shape.)

    Shapes are checked against a forward of ``batch`` x ``pos``; with ``generation`` the specs
    must also hold for every later step (no position selectors, only 1-D vectors).
    """
    model = ctx.model
    if generation:
        for spec in specs:
            if not isinstance(spec, GraphSpec | CallbackSpec):
                _check_for_generation(spec, ctx)
    hooks: list[tuple[str, HookFn]] = []
    replaced: dict[str, list[tuple[int, _Target]]] = {}
    functions = FunctionBudget()
    for number, spec, name in expand_specs(specs, model, ctx.settings.max_hook_applications):
        if isinstance(spec, GraphSpec | CallbackSpec):
            where = f"{field}[{number}]"
            hook = compile_function(ctx, spec, where, batch, pos, generation, functions, name)
            hooks.append((name, hook))
            continue
        if isinstance(spec, FeatureSteerSpec | FeatureAblateSpec | FeatureClampSpec):
            name, target, edit = _feature_edit(spec, model, batch, pos)
        else:
            target = _target(spec, name, model, batch, pos)
            edit = None
        if spec.op in REPLACING_OPS or spec.op in ("feature_ablate", "feature_clamp"):
            for other, earlier in replaced.get(name, []):
                if target.overlaps(earlier):
                    raise RequestError(
                        ErrorCode.CONFLICT,
                        f"hook specs {other} and {number} both replace the same entries "
                        f"of {name!r}",
                        "give them disjoint selectors, or combine them into one spec",
                    )
            replaced.setdefault(name, []).append((number, target))
        if edit is None:
            edit = _COMPILERS[type(spec)](_Compiling(spec, target, ctx))
        hooks.append((name, edit))
    return hooks


def _feature_edit(
    spec: FeatureSpec, model: HookedTransformer, batch: int, pos: int
) -> tuple[str, _Target, _Edit]:
    """(hook name, target, edit) of a feature spec: steering adds the decoder rows at the
    SAE's hook point; ablating and clamping set the features at its ``hook_sae_acts_post``."""
    widths = model.cfg.sae_widths  # a model shell (the API tier) knows them, not the weights
    if spec.hook not in widths:
        attached = ", ".join(widths) or "none"
        raise RequestError(
            ErrorCode.VALIDATION,
            f"hook spec {spec.op!r}: no sparse autoencoder reads {spec.hook!r}",
            f"SAEs are attached at: {attached} (GET /v1/model, cfg.sae_widths)",
        )
    acts = f"{spec.hook}.hook_sae_acts_post"
    chosen = AblateSpec(hook=acts, batch=spec.batch, pos=spec.pos, neuron=spec.feature)
    target = _target(chosen, acts, model, batch, pos)  # checks the features and selectors
    if isinstance(spec, FeatureSteerSpec):
        features = target.chosen[len(target.axes) - 1]
        at_host = AblateSpec(hook=spec.hook, batch=spec.batch, pos=spec.pos)
        host = _target(at_host, spec.hook, model, batch, pos)
        sae = model.saes.get(spec.hook)
        if sae is None:  # validated only: the workers compile it again with the weights
            return spec.hook, host, _Edit(host, lambda x: x, selected=False)
        rows = sae.W_dec[features].float().sum(0) * spec.coeff  # [d_in]

        def steer(x: torch.Tensor) -> torch.Tensor:
            # A per-head host ([batch, pos, head, d]) has the SAE's d_in = head * d.
            return x + rows.to(x.device, x.dtype).reshape(x.shape[2:])

        return spec.hook, host, _Edit(host, steer, selected=False)
    if isinstance(spec, FeatureClampSpec):
        value = float(spec.value)
        return acts, target, _Edit(target, lambda x: torch.full_like(x, value), selected=False)
    return acts, target, _Edit(target, torch.zeros_like, selected=False)
