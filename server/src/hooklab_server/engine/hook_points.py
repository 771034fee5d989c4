"""Per-call hook state: which hook points run functions or capture values on this forward.

The model holds no hook state of its own; every forward gets a :class:`HookRun`, so concurrent
calls on one shared model never see each other's hooks or captures.

A run with ``gradients`` on makes autograd track the activations (never the weights, which stay
frozen and shared): the first floating activation without a gradient path becomes the root, and
backward functions (``bwd_fns``) and gradient captures attach to each hook point's output as a
tensor hook. As in TransformerLens (a full backward hook on the HookPoint module), every backward
function at a point sees the gradient with respect to that point's output, the last one that
returns a tensor sets the gradient passed upstream, and ``{name}_grad`` holds the gradient as it
arrived.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .saes import SparseAutoencoder

HookFn = Callable[..., torch.Tensor | None]
NameOrPredicate = str | Callable[[str], bool]

_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class HookPoint:
    """What a hook function receives as ``hook``: TransformerLens's HookPoint, minus the module."""

    name: str
    ctx: dict[str, Any] = field(default_factory=dict)

    def layer(self) -> int:
        match = _LAYER.match(self.name)
        if match is None:
            raise ValueError(f"hook point {self.name!r} is not inside a block")
        return int(match.group(1))


def resolve_names(
    selector: NameOrPredicate | Sequence[str] | None, names: Iterable[str]
) -> list[str]:
    """Hook names matching a TransformerLens-style selector: None (all), a name, a list of
    names, or a predicate on the name."""
    names = list(names)
    if selector is None:
        return names
    if isinstance(selector, str):
        return [selector] if selector in names else []
    if callable(selector):
        return [name for name in names if selector(name)]
    wanted = set(selector)
    return [name for name in names if name in wanted]


class HookRun:
    """Hook functions and captures for one forward (or one generation)."""

    __slots__ = (
        "bwd_fns", "cache", "capture", "capture_grad", "explicit", "fns", "gradients",
        "interrupt", "points", "saes",
    )  # fmt: skip

    def __init__(
        self,
        fns: dict[str, list[HookFn]] | None = None,
        capture: Iterable[str] = (),
        explicit: Iterable[str] = (),
        interrupt: Callable[[], None] | None = None,
        *,
        bwd_fns: dict[str, list[HookFn]] | None = None,
        capture_grad: Iterable[str] = (),
        gradients: bool = False,
        saes: Mapping[str, SparseAutoencoder] | None = None,
    ) -> None:
        self.fns = fns or {}
        self.bwd_fns = bwd_fns or {}
        self.capture_grad = frozenset(capture_grad)
        # Autograd on activations for this forward (implied by backward functions or captures).
        self.gradients = gradients or bool(self.bwd_fns) or bool(self.capture_grad)
        # Called before every block; a caller stops the forward by raising from it.
        self.interrupt = interrupt
        self.capture = frozenset(capture)
        # Names asked for by exact name: conditional hook points fire for these.
        self.explicit = frozenset(explicit) | self.fns.keys() | self.bwd_fns.keys()
        self.cache: dict[str, torch.Tensor] = {}
        self.points: dict[str, HookPoint] = {}
        # The attached SAEs this forward runs: those with a point hooked or captured.
        self.saes = _active_saes(
            saes or {}, (*self.fns, *self.capture, *self.bwd_fns, *self.capture_grad)
        )

    def wants(self, name: str) -> bool:
        return self.gradients or name in self.fns or name in self.capture or name in self.saes

    def runs_per_call(self, name: str) -> bool:
        """Whether something at this point sees each call of a module used several times
        (ln1 once per attention input, as in TransformerLens): a hook function, forward or
        backward, or a gradient capture (the last backward call's gradient, as in TL)."""
        return name in self.fns or self.wants_gradient(name)

    def wants_gradient(self, name: str) -> bool:
        """A backward function or a gradient capture at this point."""
        return name in self.bwd_fns or name in self.capture_grad

    def asks_for(self, name: str) -> bool:
        """Whether a conditional hook point should fire: hooked, or captured by exact name."""
        return name in self.explicit

    def flat_rows(self, batch: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """Hooks for an activation whose leading axis flattens ``batch`` rows with the axes
        after them (TransformerLens's per-head qk-norm points, [batch * pos * heads, ...])."""
        return self

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        fns = self.fns.get(name)
        if fns:
            point = self.points.get(name) or self.points.setdefault(name, HookPoint(name))
            for fn in fns:
                result = fn(value, hook=point)
                if result is not None:
                    value = result
        if name in self.capture:
            self.cache[name] = value.detach()
        if self.gradients and value.is_floating_point():
            if not value.requires_grad:  # a root of the graph: the embeddings, a given residual
                # (one made under inference mode, e.g. a hook's replacement, is copied first)
                value = value.clone() if value.is_inference() else value.detach()
                value.requires_grad_()
            if name in self.bwd_fns or name in self.capture_grad:
                # Its own autograd node: consecutive points can share one tensor
                # (resid_post, the next resid_pre), and each must see the gradient as it
                # leaves the later one, as TransformerLens's separate modules do.
                value = value.view_as(value)
                value.register_hook(self._backward(name))
        sae = self.saes.get(name)
        if sae is not None:
            value = sae.run(self, name, value)
        return value

    def _backward(self, name: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
        fns = self.bwd_fns.get(name, ())

        def on_gradient(grad: torch.Tensor) -> torch.Tensor | None:
            if name in self.capture_grad:
                self.cache[f"{name}_grad"] = grad.detach()
            point = self.points.get(name) or self.points.setdefault(name, HookPoint(name))
            passed = None
            for fn in fns:
                result = fn(grad, hook=point)
                if result is not None:
                    passed = result
            return passed

        return on_gradient


def _active_saes(
    saes: Mapping[str, SparseAutoencoder], names: Iterable[str]
) -> dict[str, SparseAutoencoder]:
    if not saes:
        return {}
    hosts = {name.partition(".hook_sae_")[0] for name in names if ".hook_sae_" in name}
    return {host: sae for host, sae in saes.items() if host in hosts}


NO_HOOKS = HookRun()


class RowHooks(HookRun):
    """The hook runs of several requests sharing one forward, each on its own rows (a slice of
    the batch axis): its functions see, change and capture only those rows."""

    __slots__ = ("parts",)

    def __init__(
        self,
        parts: Sequence[tuple[slice, HookRun]],
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        fns: dict[str, list[HookFn]] = {}
        for _, run in parts:
            for name, run_fns in run.fns.items():
                fns.setdefault(name, []).extend(run_fns)
        capture = frozenset().union(*(run.capture for _, run in parts))
        explicit = frozenset().union(*(run.explicit for _, run in parts))
        super().__init__(fns, capture, explicit, interrupt)
        self.saes = {host: sae for _, run in parts for host, sae in run.saes.items()}
        self.parts = [(rows, run) for rows, run in parts if run.fns or run.capture]

    def flat_rows(self, batch: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """Each request's hooks see the flattened activation of its own rows only."""

        def fire(name: str, value: torch.Tensor) -> torch.Tensor:
            if not self.wants(name):
                return value
            grid = value.view(batch, -1, *value.shape[1:])  # [batch, pos * heads, ...]
            out = grid
            for rows, run in self.parts:
                if not run.wants(name):
                    continue
                piece = out[rows]
                flat = piece.flatten(0, 1)
                result = run(name, flat)
                if result is not flat:
                    if out is grid:  # a capture may hold value: write the result into a copy
                        out = grid.clone()
                    out[rows] = result.view_as(piece)
            return out.flatten(0, 1)

        return fire

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if not self.wants(name):
            return value
        out = value
        for rows, run in self.parts:
            if not run.wants(name):
                continue
            piece = out[rows]
            result = run(name, piece)
            if result is not piece:
                if out is value:  # a capture may hold value: write the result into a copy
                    out = value.clone()
                out[rows] = result
        return out


def _hook_fns(
    hook_names: Sequence[str], hooks: Iterable[tuple[NameOrPredicate, HookFn]]
) -> dict[str, list[HookFn]]:
    fns: dict[str, list[HookFn]] = {}
    for selector, fn in hooks:
        if isinstance(selector, str) and selector not in hook_names:
            raise KeyError(unknown_hook_message(selector, hook_names))
        for name in resolve_names(selector, hook_names):
            fns.setdefault(name, []).append(fn)
    return fns


def build_hook_run(
    hook_names: Sequence[str],
    fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
    names_filter: NameOrPredicate | Sequence[str] | None = None,
    capture: bool = False,
    interrupt: Callable[[], None] | None = None,
    bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
    incl_bwd: bool = False,
    saes: Mapping[str, SparseAutoencoder] | None = None,
) -> HookRun:
    """Resolve TransformerLens-style ``fwd_hooks``, ``bwd_hooks`` and ``names_filter`` against
    ``hook_names``; ``incl_bwd`` captures the gradients of the names captured.

    An exact name that is not a hook point raises ``KeyError`` with the nearest valid names.
    """
    fns = _hook_fns(hook_names, fwd_hooks)
    bwd_fns = _hook_fns(hook_names, bwd_hooks)
    if not capture:
        return HookRun(fns, interrupt=interrupt, bwd_fns=bwd_fns, saes=saes)
    if isinstance(names_filter, str) and names_filter not in hook_names:
        raise KeyError(unknown_hook_message(names_filter, hook_names))
    explicit = [names_filter] if isinstance(names_filter, str) else []
    if (
        names_filter is not None
        and not isinstance(names_filter, str)
        and not callable(names_filter)
    ):
        unknown = [name for name in names_filter if name not in hook_names]
        if unknown:
            raise KeyError(unknown_hook_message(unknown[0], hook_names))
        explicit = list(names_filter)
    captured = resolve_names(names_filter, hook_names)
    return HookRun(
        fns,
        captured,
        explicit,
        interrupt,
        bwd_fns=bwd_fns,
        capture_grad=captured if incl_bwd else (),
        saes=saes,
    )


def unknown_hook_message(name: str, hook_names: Sequence[str]) -> str:
    advice = hook_name_advice(name, hook_names)
    return f"unknown hook point {name!r}" + (f"; {advice}" if advice else "")


_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_name_advice(name: str, hook_names: Sequence[str]) -> str | None:
    """What to say about a name that is no hook point: the layers there are, when it names a
    block past the last; else the nearest names."""
    import difflib

    block = _BLOCK_NAME.match(name)
    if block is not None and f"blocks.0.{block.group(2)}" in hook_names:
        indices = (_BLOCK_NAME.match(hook) for hook in hook_names)
        layers = 1 + max(int(found.group(1)) for found in indices if found is not None)
        return f"this model has {layers} layers: blocks.0 … blocks.{layers - 1}"
    near = difflib.get_close_matches(name, hook_names, n=3, cutoff=0.5)
    return f"did you mean {', '.join(near)}?" if near else None
