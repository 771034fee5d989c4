"""Hook specs: what to do at a hook point, built here and run on the server.

Use them where TransformerLens takes a hook function::

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.5.hook_resid_post", hooks.ablate())])
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"),
                                             hooks.ablate("mean", head=[7]))])

Selectors (keyword-only on every builder): ``batch``, ``pos`` (the query position for attention
patterns), ``head`` and ``neuron`` (the last axis) — an int or a list of ints; omitted means all.
Tensors may be torch tensors or ids of tensors stored with ``model.store_tensor``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .function_hooks import Forced

Indices = int | list[int] | None
TensorLike = torch.Tensor | str  # a tensor, or the id of a stored tensor


def _tensor(value: TensorLike) -> Any:
    return {"ref": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class HookSpec:
    """One operation with its selectors; the hook name is given where it is used."""

    op: str
    fields: dict[str, Any] = field(default_factory=dict)

    def at(self, hook: str) -> dict[str, Any]:
        """The wire form of this spec applied at hook point (or pattern) ``hook``."""
        return {"hook": hook, "op": self.op, **self.fields}


def _spec(op: str, selectors: dict[str, Indices], **fields: Any) -> HookSpec:
    chosen = {name: value for name, value in selectors.items() if value is not None}
    return HookSpec(op, {**{k: v for k, v in fields.items() if v is not None}, **chosen})


def ablate(
    mode: Literal["zero", "mean", "resample"] = "zero",
    *,
    mean_over: Literal["batch", "pos"] = "batch",
    source_batch: list[int] | None = None,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    """Zero the selection, set it to its mean (over the batch or positions), or resample it
    from other batch rows (``source_batch[i]`` replaces row i; default: the next row)."""
    return _spec(
        "ablate",
        dict(batch=batch, pos=pos, head=head, neuron=neuron),
        mode=mode,
        mean_over=mean_over,
        source_batch=source_batch,
    )


def patch(
    source: str | torch.Tensor | None = None,
    *,
    source_row: int | None = None,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    """Overwrite the selection with: the same hook's activation from a stored cache (``source``
    a cache id), an inline tensor (shaped like the activation or the selection), or another
    prompt of the same batch (``source_row``)."""
    if (source is None) == (source_row is None):
        raise ValueError("patch takes either a source (cache id or tensor) or source_row")
    if source_row is not None:
        origin: dict[str, Any] = {"batch": source_row}
    elif isinstance(source, str):
        origin = {"cache": source}
    else:
        origin = {"tensor": source}
    return _spec("patch", dict(batch=batch, pos=pos, head=head, neuron=neuron), source=origin)


def steer(
    vector: TensorLike,
    coeff: float = 1.0,
    *,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    """Add ``coeff * vector`` (the activation's last axis, or the selection's shape)."""
    return _spec(
        "steer", dict(batch=batch, pos=pos, head=head, neuron=neuron),
        vector=_tensor(vector), coeff=coeff,
    )  # fmt: skip


def scale(
    factor: float,
    *,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    return _spec("scale", dict(batch=batch, pos=pos, head=head, neuron=neuron), factor=factor)


def clamp(
    min: float | None = None,
    max: float | None = None,
    *,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    return _spec("clamp", dict(batch=batch, pos=pos, head=head, neuron=neuron), min=min, max=max)


def set(  # the operation's name, shadowing the builtin inside this module only
    value: float | TensorLike,
    *,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    """Set the selection to a number or a tensor broadcastable to it."""
    wire = float(value) if isinstance(value, int | float) else _tensor(value)
    return _spec("set", dict(batch=batch, pos=pos, head=head, neuron=neuron), value=wire)


def project_out(
    direction: TensorLike,
    *,
    batch: Indices = None,
    pos: Indices = None,
    head: Indices = None,
    neuron: Indices = None,
) -> HookSpec:
    """Directional ablation: remove the component along ``direction`` (last axis)."""
    return _spec(
        "project_out", dict(batch=batch, pos=pos, head=head, neuron=neuron),
        direction=_tensor(direction),
    )  # fmt: skip


# --- sparse autoencoder features: used at the hook point an SAE reads ---------------------
# (model.saes lists them), e.g. ("blocks.3.hook_resid_post", hooks.feature_steer(12, 4.0)).


def feature_steer(
    feature: int | list[int], coeff: float = 1.0, *, batch: Indices = None, pos: Indices = None
) -> HookSpec:
    """Add ``coeff * W_dec[feature]`` (each feature's decoder row) at the SAE's hook point."""
    return _spec("feature_steer", dict(batch=batch, pos=pos), feature=feature, coeff=coeff)


def feature_ablate(
    feature: int | list[int], *, batch: Indices = None, pos: Indices = None
) -> HookSpec:
    """Zero the features' activations (the SAE's error term kept)."""
    return _spec("feature_ablate", dict(batch=batch, pos=pos), feature=feature)


def feature_clamp(
    feature: int | list[int], value: float, *, batch: Indices = None, pos: Indices = None
) -> HookSpec:
    """Set the features' activations to ``value``."""
    return _spec("feature_clamp", dict(batch=batch, pos=pos), feature=feature, value=value)


# --- Python hook functions: how they run ---------------------------------------------------


def traced(fn: Callable[..., Any]) -> Forced:
    """Run ``fn`` on the server as a traced graph, or raise saying why it cannot be traced
    (instead of falling back to a callback)."""
    return Forced(fn, "traced")


def callback(fn: Callable[..., Any]) -> Forced:
    """Run ``fn`` on this machine at every firing (the server pauses the forward and sends the
    activation), without trying to trace it first."""
    return Forced(fn, "callback")
