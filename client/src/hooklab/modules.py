"""TransformerLens's module tree over a remote model: ``model.blocks[3].attn.hook_z``,
``model.embed.W_E``, ``model.hook_dict``, ``named_parameters()``, ``state_dict()``.

The tree is derived from the hook point names the server lists (a module for every prefix of
a hook name, plus ``embed``/``pos_embed``/``unembed``, which hold weights but no hooks). Which
weights a module holds follows TransformerLens's rules on the config (norm weights by
``normalization_type``, ``_W_K`` for grouped-query attention, ``W_gate`` for gated MLPs).
Weights are fetched on first use, once, and shared between every name that means them:
``model.W_U is model.unembed.W_U``, and a block's ``W_Q`` is a view of ``model.W_Q`` when the
stacked tensor was fetched first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, overload

import torch

from .factored_matrix import FactoredMatrix

if TYPE_CHECKING:
    from .config import HookedTransformerConfig

# Model-level names of weights that live in a module (the same tensor either way).
GLOBAL_ALIASES = {
    "W_E": "embed.W_E",
    "W_pos": "pos_embed.W_pos",
    "W_U": "unembed.W_U",
    "b_U": "unembed.b_U",
}
# Weights stacked over layers by the model's properties (``model.W_Q`` is [n_layers, ...]).
STACKED = frozenset(
    ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in",
     "b_out"]
)  # fmt: skip
_LAYER_WEIGHT = re.compile(r"^blocks\.(\d+)\.(?:attn|mlp)\.([Wb]_\w+)$")

# TransformerLens registers modules in this order, which is the order of named_parameters().
_MODULE_ORDER = {"embed": 0, "pos_embed": 1, "blocks": 2, "ln_final": 3, "unembed": 4,
                 "ln1": 0, "ln2": 1, "attn": 2, "mlp": 3}  # fmt: skip


class Weights:
    """The model's weights by TransformerLens name, each fetched once (``fetch`` raises
    KeyError for a name the model lacks; that answer is remembered too)."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]) -> None:
        self._fetch = fetch
        self._fetched: dict[str, torch.Tensor] = {}
        self._missing: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        name = GLOBAL_ALIASES.get(name, name)
        if name in self._fetched:
            return self._fetched[name]
        if name in self._missing:
            raise KeyError(f"the model has no parameter {name!r}")
        value = self._from_stack(name)
        if value is None:
            try:
                value = self._fetch(name)
            except KeyError:
                self._missing.add(name)
                raise
        self._fetched[name] = value
        return value

    def _from_stack(self, name: str) -> torch.Tensor | None:
        """One layer's slice of a stacked weight already fetched (no request)."""
        match = _LAYER_WEIGHT.match(name)
        if match is None or match[2] not in self._fetched:
            return None
        return self._fetched[match[2]][int(match[1])]


def _norm_weights(normalization_type: str | None) -> tuple[str, ...]:
    # Folded norms (LNPre, RMSPre) have no weights of their own.
    return {"LN": ("w", "b"), "RMS": ("w",)}.get(normalization_type or "", ())


def module_weights(kind: str, cfg: HookedTransformerConfig) -> tuple[str, ...]:
    """The weights TransformerLens gives a module named ``kind``, in its registration order."""
    if kind in ("ln1", "ln2"):
        return _norm_weights(cfg.normalization_type)
    if kind == "ln_final":
        final = "RMS" if cfg.final_rms and cfg.normalization_type == "LN" else None
        return _norm_weights(final or cfg.normalization_type)
    if kind == "attn":
        grouped = cfg.n_key_value_heads not in (None, cfg.n_heads)
        kv = "_" if grouped else ""
        return ("W_Q", "W_O", "b_Q", "b_O", f"{kv}W_K", f"{kv}W_V", f"{kv}b_K", f"{kv}b_V")
    if kind == "mlp":
        if cfg.gated_mlp:
            return ("W_in", "W_out", "W_gate", "b_in", "b_out")
        return ("W_in", "b_in", "W_out", "b_out")
    return {"embed": ("W_E",), "pos_embed": ("W_pos",), "unembed": ("W_U", "b_U")}.get(kind, ())


class _HookHost(Protocol):
    """What a hook point needs of its model."""

    _hooks: list[Any]
    _bwd_hooks: list[Any]

    @property
    def add_hook(self) -> Callable[..., None]: ...  # add_hook(name, hook, dir, **options)


class HookPoint:
    """A named hook point of the remote model, TransformerLens's ``HookPoint`` API:
    ``name``, ``layer()``, ``ctx``, ``add_hook(fn)`` and ``remove_hooks()``."""

    def __init__(self, model: _HookHost, name: str) -> None:
        self._model = model
        self.name = name
        self.ctx: dict[Any, Any] = {}
        self._added: set[int] = set()  # ids of the entries add_hook put in the model's lists

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        parts = self.name.split(".")
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{self.name} is not inside a block, so it has no layer")
        return int(parts[1])

    def _lists(self, dir: str) -> list[list[Any]]:
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', not {dir!r}")
        model = self._model
        return [model._hooks] * (dir != "bwd") + [model._bwd_hooks] * (dir != "fwd")

    def add_hook(
        self,
        hook: Any,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Add ``hook`` here, on the model (it applies to the model's later calls)."""
        options = {"is_permanent": is_permanent, "level": level, "prepend": prepend}
        chosen = {key: value for key, value in options.items() if value not in (False, None)}
        (hooks,) = self._lists(dir)
        before = {id(entry) for entry in hooks}
        self._model.add_hook(self.name, hook, dir=dir, **chosen)
        self._added.update(id(entry) for entry in hooks if id(entry) not in before)

    def remove_hooks(
        self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """Remove the hooks added through this hook point (only those), of ``dir``."""
        for hooks in self._lists(dir):
            hooks[:] = [entry for entry in hooks if id(entry) not in self._added]

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


class Module:
    """A module of the remote model: its sub-modules and hook points as attributes, and its
    weights, fetched on first access."""

    def __init__(self, name: str, weights: Weights, weight_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self._weights = weights
        self._weight_names = weight_names
        self._children: dict[str, Module | HookPoint] = {}

    def _add(self, key: str, child: Module | HookPoint) -> None:
        self._children[key] = child
        if not key.isdigit():
            setattr(self, key, child)

    def _sort(self) -> None:
        order = sorted(self._children, key=lambda key: _MODULE_ORDER.get(key, len(_MODULE_ORDER)))
        self._children = {key: self._children[key] for key in order}

    def _weight_name(self, name: str) -> str:
        return f"{self.name}.{name}" if self.name else name

    def __getattr__(self, name: str) -> torch.Tensor:
        # Only reached for names that are not attributes: the module's weights (and, for
        # grouped-query attention, the repeated W_K/W_V/b_K/b_V that TransformerLens offers).
        weight_names = self.__dict__.get("_weight_names", ())
        if name in weight_names or f"_{name}" in weight_names:
            return self._weights.get(self._weight_name(name))
        raise AttributeError(f"{type(self).__name__} {self.name!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._weight_names})

    def children(self) -> Iterator[Module | HookPoint]:
        return iter(self._children.values())

    def named_children(self) -> Iterator[tuple[str, Module | HookPoint]]:
        return iter(self._children.items())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module | HookPoint]]:
        """Every sub-module and hook point below this one, by dotted name."""
        for key, child in self._children.items():
            name = f"{prefix}.{key}" if prefix else key
            yield name, child
            if isinstance(child, Module):
                yield from child.named_modules(name)

    def hook_points(self) -> list[HookPoint]:
        return [child for _, child in self.named_modules() if isinstance(child, HookPoint)]

    def parameter_names(self, prefix: str = "", recurse: bool = True) -> Iterator[str]:
        for name in self._weight_names:
            yield f"{prefix}.{name}" if prefix else name
        if recurse:
            for key, child in self._children.items():
                if isinstance(child, Module):
                    yield from child.parameter_names(f"{prefix}.{key}" if prefix else key)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weight) pairs, each weight fetched as the iteration reaches it."""
        for name in self.parameter_names("", recurse):
            yield (
                (f"{prefix}.{name}" if prefix else name),
                self._weights.get(self._weight_name(name)),
            )

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, weight in self.named_parameters(recurse=recurse):
            yield weight

    def state_dict(self) -> LazyStateDict:
        """The weights by name; each is fetched when first read."""
        names = [self._weight_name(name) for name in self.parameter_names()]
        return LazyStateDict(self._weights, names, len(self.name) + 1 if self.name else 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ModuleList(Module):
    """``model.blocks``: indexable, iterable, sized."""

    @overload
    def __getitem__(self, index: int) -> Module: ...
    @overload
    def __getitem__(self, index: slice) -> list[Module]: ...
    def __getitem__(self, index: int | slice) -> Module | list[Module]:
        return list(self)[index]

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Module]:
        return (child for child in self._children.values() if isinstance(child, Module))


class Circuits:
    """TransformerLens's ``QK`` and ``OV`` circuits, of whatever holds ``W_Q``…``W_O`` (one
    layer's attention, or the model's weights stacked over layers)."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)


class Attention(Module, Circuits):
    """An attention module: TransformerLens's per-layer ``QK`` and ``OV`` circuits too."""


class LazyStateDict(Mapping[str, torch.Tensor]):
    """TransformerLens's ``state_dict()`` names (weights only, no buffers), fetched on read."""

    def __init__(self, weights: Weights, names: list[str], strip: int) -> None:
        self._weights = weights
        self._names = {name[strip:]: name for name in names}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._names:
            raise KeyError(key)
        return self._weights.get(self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LazyStateDict({list(self._names)})"


def _module_class(key: str, child_keys: list[str]) -> type[Module]:
    if child_keys and all(child.isdigit() for child in child_keys):
        return ModuleList
    return Attention if key == "attn" else Module


def build_tree(
    model: _HookHost, hook_names: list[str], cfg: HookedTransformerConfig, weights: Weights
) -> tuple[Module, dict[str, HookPoint]]:
    """The root module (the model's own children and hook points) and the hook points by name."""
    paths: dict[str, list[str]] = {"": []}  # module path -> child keys, in order of appearance

    def add_path(path: str) -> None:
        if path in paths:
            return
        parent, _, key = path.rpartition(".")
        if parent:
            add_path(parent)
        paths[path] = []
        paths[parent].append(key)

    # embed, pos_embed and unembed hold weights; only some of their hook points exist.
    add_path("embed")
    if "hook_pos_embed" in hook_names:
        add_path("pos_embed")
    add_path("unembed")
    for name in hook_names:
        module_path = name.rpartition(".")[0]
        if module_path:
            add_path(module_path)

    modules: dict[str, Module] = {}
    for path, child_keys in paths.items():
        key = path.rpartition(".")[2]
        kind = "" if key.isdigit() else key
        modules[path] = _module_class(key, child_keys)(path, weights, module_weights(kind, cfg))
    for path in paths:
        if path:
            parent, _, key = path.rpartition(".")
            modules[parent]._add(key, modules[path])
    hook_dict = {}
    for name in hook_names:
        module_path, _, key = name.rpartition(".")
        hook_dict[name] = HookPoint(model, name)
        modules[module_path]._add(key, hook_dict[name])
    for module in modules.values():
        module._sort()
    return modules[""], hook_dict
