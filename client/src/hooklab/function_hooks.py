"""Python hook functions in requests: traced into graphs, or run here as callbacks.

Where TransformerLens takes ``fn(activation, hook)``, the client traces ``fn`` for the shape
the activation will have at each hook point it names (``tracing``) and sends the graph; a
function that cannot be traced runs on this machine instead (a callback over the websocket,
``callbacks``), with one notice per function and reason saying why and what it costs.
``model.hook_mode`` chooses: ``"auto"`` (trace, else call back), ``"traced"`` (trace or raise)
or ``"callback"``; ``hooks.traced(fn)`` and ``hooks.callback(fn)`` choose per function.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from hooklab_proto import axis_sizes as wire_axis_sizes

from .tracing import TracedGraph, Untraceable, trace

HookMode = Literal["auto", "traced", "callback"]
HOOK_MODES: tuple[str, ...] = ("auto", "traced", "callback")


class HooklabHookNotice(UserWarning):
    """A hook function runs on this machine (a callback) rather than on the server."""


@dataclass(frozen=True)
class Forced:
    """A hook function with its mode chosen by ``hooks.traced`` / ``hooks.callback``."""

    fn: Callable[..., Any]
    mode: HookMode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class CallbackRegistry(Protocol):
    def register(self, fn: Callable[..., Any], hook_name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ShapePlan:
    """The activation shapes a call will show a hook point: a forward's, or a generation's
    first pass and (with the KV cache) its later single-position steps."""

    batch: int
    pos: int
    generation: bool = False
    kv_cache: bool = True


def default_mode() -> HookMode:
    mode = os.environ.get("HOOKLAB_HOOK_MODE", "auto")
    if mode not in HOOK_MODES:
        raise ValueError(f"HOOKLAB_HOOK_MODE={mode!r}; expected one of {HOOK_MODES}")
    return mode  # type: ignore[return-value]


def concrete_shape(symbolic: Sequence[str | int], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(axis if isinstance(axis, int) else sizes[axis] for axis in symbolic)


def axis_sizes(
    cfg: dict[str, Any], batch: int, pos: int, key_pos: int | None = None
) -> dict[str, int]:
    """The size of each named axis (the names of ``/v1/model``'s hook shapes); an attached
    SAE's features are the axis ``d_sae[HOOK]``."""
    sizes = wire_axis_sizes(
        batch, pos, key_pos, n_heads=cfg["n_heads"], n_kv_heads=cfg.get("n_key_value_heads"),
        d_head=cfg["d_head"], d_model=cfg["d_model"], d_mlp=cfg.get("d_mlp"),
        d_vocab=cfg.get("d_vocab_out") or cfg["d_vocab"],
    )  # fmt: skip
    for hook, width in (cfg.get("sae_widths") or {}).items():
        sizes[f"d_sae[{hook}]"] = int(width)
    return sizes


class FunctionHooks:
    """Turns (hook name, function) pairs of one call into wire hook entries."""

    def __init__(
        self,
        cfg: dict[str, Any],
        shapes: dict[str, Sequence[str | int]],
        dtype: torch.dtype,
        callbacks: Callable[[], CallbackRegistry],
        hook_of: Callable[[str], Any],
    ) -> None:
        self.cfg = cfg
        self.shapes = shapes
        self.dtype = dtype
        self.callbacks = callbacks  # opened on first need
        # What a function gets as ``hook``: the model's HookPoint (name, layer(), ctx kept
        # across calls), as TransformerLens passes its module.
        self.hook_of = hook_of
        self.noticed: set[tuple[str, str]] = set()

    def entry(
        self, name: str, fn: Callable[..., Any], plan: ShapePlan, mode: HookMode
    ) -> dict[str, Any]:
        if isinstance(fn, Forced):
            mode = fn.mode
            fn = fn.fn
        if mode != "callback":
            try:
                return {"hook": name, "op": "graph", "graphs": self._graphs(name, fn, plan)}
            except Untraceable as exc:
                if mode == "traced":
                    raise TypeError(
                        f"hooklab cannot trace {_name(fn)} at {name}: {exc.message} [{exc.reason}]"
                    ) from None
                self._notice(fn, name, exc, plan)
        return {"hook": name, "op": "callback", **self.callbacks().register(fn, name)}

    def _hook(self, name: str) -> Any:
        return self.hook_of(name)

    def _trace(self, name: str, fn: Callable[..., Any], shape: tuple[int, ...]) -> TracedGraph:
        return trace(fn, name, shape, self.dtype, hook=self._hook(name))

    def _graphs(self, name: str, fn: Callable[..., Any], plan: ShapePlan) -> list[dict[str, Any]]:
        symbolic = self.shapes[name]
        first = concrete_shape(symbolic, axis_sizes(self.cfg, plan.batch, plan.pos))
        graphs = [self._trace(name, fn, first).graph]
        if not plan.generation:
            return graphs
        # Later steps: traced at two lengths; identical graphs hold for every length.
        if plan.kv_cache:
            steps = [axis_sizes(self.cfg, plan.batch, 1, plan.pos + k) for k in (1, 2)]
        else:
            steps = [axis_sizes(self.cfg, plan.batch, plan.pos + k) for k in (1, 2)]
        one, two = (concrete_shape(symbolic, sizes) for sizes in steps)
        step_one, step_two = self._trace(name, fn, one), self._trace(name, fn, two)
        if not _same_graph(step_one.graph, step_two.graph):
            raise Untraceable(
                "shape-dependent",
                "its graph changes with the sequence length, so it cannot run at every "
                "generation step",
            )
        generic = [a if a == b else None for a, b in zip(one, two, strict=True)]
        step_one.graph["input"]["shape"] = generic
        return [*graphs, step_one.graph]

    def _notice(self, fn: Callable[..., Any], name: str, exc: Untraceable, plan: ShapePlan) -> None:
        key = (_name(fn), exc.reason)
        if key in self.noticed:
            return
        self.noticed.add(key)
        shape = concrete_shape(self.shapes[name], axis_sizes(self.cfg, plan.batch, plan.pos))
        size = math.prod(shape) * self.dtype.itemsize
        warnings.warn(
            f"hooklab: {_name(fn)} at {name} runs on your machine (a callback: a round trip "
            f"per firing, the activation (a backward hook: its gradient) of {size:,} bytes down "
            "and, if changed, back up): "
            f"{exc.message} "
            f"[{exc.reason}]. Keep it on the server by using only tensor operations "
            "(e.g. torch.where instead of if), or mark it hooks.callback(fn) to silence this.",
            HooklabHookNotice,
            stacklevel=4,
        )


def _same_graph(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two traces differ only in their input shape."""
    if (
        a["nodes"] != b["nodes"]
        or a["output"] != b["output"]
        or len(a["consts"]) != len(b["consts"])
    ):
        return False
    return all(
        x["tensor"].shape == y["tensor"].shape and torch.equal(x["tensor"], y["tensor"])
        for x, y in zip(a["consts"], b["consts"], strict=True)
    )


def _name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)
    return str(getattr(inner, "__qualname__", type(inner).__name__))
