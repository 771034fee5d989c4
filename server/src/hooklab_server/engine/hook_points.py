"""Per-call hook state: which hook points run functions or capture values on this forward.

The model holds no hook state of its own; every forward gets a :class:`HookRun`, so concurrent
calls on one shared model never see each other's hooks or captures.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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

    __slots__ = ("cache", "capture", "explicit", "fns", "interrupt", "points")

    def __init__(
        self,
        fns: dict[str, list[HookFn]] | None = None,
        capture: Iterable[str] = (),
        explicit: Iterable[str] = (),
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.fns = fns or {}
        # Called before every block; a caller stops the forward by raising from it.
        self.interrupt = interrupt
        self.capture = frozenset(capture)
        # Names asked for by exact name: conditional hook points fire for these.
        self.explicit = frozenset(explicit) | self.fns.keys()
        self.cache: dict[str, torch.Tensor] = {}
        self.points: dict[str, HookPoint] = {}

    def wants(self, name: str) -> bool:
        return name in self.fns or name in self.capture

    def asks_for(self, name: str) -> bool:
        """Whether a conditional hook point should fire: hooked, or captured by exact name."""
        return name in self.explicit

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
        return value


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
        self.parts = [(rows, run) for rows, run in parts if run.fns or run.capture]

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


def build_hook_run(
    hook_names: Sequence[str],
    fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
    names_filter: NameOrPredicate | Sequence[str] | None = None,
    capture: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> HookRun:
    """Resolve TransformerLens-style ``fwd_hooks`` and ``names_filter`` against ``hook_names``.

    An exact name that is not a hook point raises ``KeyError`` with the nearest valid names.
    """
    fns: dict[str, list[HookFn]] = {}
    for selector, fn in fwd_hooks:
        if isinstance(selector, str) and selector not in hook_names:
            raise KeyError(unknown_hook_message(selector, hook_names))
        for name in resolve_names(selector, hook_names):
            fns.setdefault(name, []).append(fn)
    if not capture:
        return HookRun(fns, interrupt=interrupt)
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
    return HookRun(fns, resolve_names(names_filter, hook_names), explicit, interrupt)


def unknown_hook_message(name: str, hook_names: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, hook_names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return f"unknown hook point {name!r}{hint}"
