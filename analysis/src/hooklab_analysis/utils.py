"""TransformerLens 3.9's small utilities: hook-name shorthand (``get_act_name``) and ``Slice``.

Both behave exactly as ``transformer_lens.utilities.get_act_name`` / ``Slice`` do, so notebook code
written against TransformerLens indexes a hooklab cache the same way. ``Slice`` keeps its index
arrays as torch tensors (TransformerLens converts them to numpy), so the client needs no numpy.
"""

from __future__ import annotations

import builtins
import re
from typing import Literal, TypeAlias

import torch

# ---- get_act_name ----------------------------------------------------------------------------

# "<letters><digits><rest>": k6 -> ("k", "6", ""), scale4ln1 -> ("scale", "4", "ln1").
_SHORTHAND = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")

_NAME_ALIASES: dict[str, str] = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES: dict[str, str] = {
    "a": "attn",
    "attention": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
}
_ATTN_NAMES = frozenset({"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"})
_MLP_NAMES = frozenset({"pre", "post", "mid", "pre_linear"})
_NORM_NAMES = frozenset({"scale", "normalized"})


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The full hook name for a TransformerLens shorthand.

    ``get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"``, ``get_act_name("pre", 2) ==
    "blocks.2.mlp.hook_pre"``, ``get_act_name("embed") == "hook_embed"``, ``get_act_name("k6")``
    (name, layer and type packed in one word), ``get_act_name("scale") ==
    "ln_final.hook_scale"``. A full name (with a dot, or starting with ``hook_``) is returned as
    it is when no layer or type is given.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    packed = _SHORTHAND.match(name)
    if packed is not None:  # as in TL, the packed layer/type win over the arguments
        name, layer, layer_type = packed.groups()
    name = _NAME_ALIASES.get(name, name)

    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]

    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in _NORM_NAMES and layer is None:
        full = f"ln_final.{full}"
    return full


# ---- Slice -----------------------------------------------------------------------------------

SliceInput: TypeAlias = (
    int | tuple[int] | tuple[int, int] | tuple[int, int, int] | list[int] | torch.Tensor | None
)
"""What TransformerLens accepts wherever it takes a slice (numpy arrays work too)."""

SliceMode = Literal["int", "slice", "array", "identity"]


def _is_array_like(value: object) -> bool:
    """A numpy array (checked without importing numpy)."""
    return type(value).__module__ == "numpy" and hasattr(value, "__array__")


class Slice:
    """A slice along one axis, TransformerLens style.

    ``None`` leaves the axis alone; an ``int`` indexes it away; a tuple is ``slice(*tuple)``
    (``(k,)`` = ``:k``, ``(a, b)`` = ``a:b``, ``(a, b, step)``); a list, tensor or numpy array
    gathers those indices (or applies that boolean mask) and keeps the axis.
    """

    # Inside this class body ``slice`` names the attribute, so annotations spell the builtin out.
    slice: int | builtins.slice | torch.Tensor
    mode: SliceMode

    def __init__(self, input_slice: SliceInput | builtins.slice = None) -> None:
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):  # bool too, as in TL
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, list | torch.Tensor) or _is_array_like(input_slice):
            index = torch.as_tensor(input_slice)
            self.slice, self.mode = index.detach().cpu(), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"Invalid input_slice {input_slice}")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``tensor`` sliced along ``dim`` (negative dims count from the end)."""
        index: list[int | builtins.slice | torch.Tensor] = [slice(None)] * tensor.ndim
        selector = self.slice
        if isinstance(selector, torch.Tensor) and selector.device != tensor.device:
            selector = selector.to(tensor.device)
        index[dim] = selector
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> torch.Tensor:
        """The positions this slice picks from an axis of length ``max_ctx`` (int64)."""
        if self.mode == "int":
            return torch.tensor([self.slice], dtype=torch.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return torch.arange(max_ctx, dtype=torch.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput) -> Slice:
        """A Slice; an int becomes ``[int]`` so that the axis is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            slice_input = [slice_input]
        return cls(slice_input)


def as_slice(value: Slice | SliceInput | slice) -> Slice:
    """``value`` as a :class:`Slice` (unchanged if it already is one)."""
    return value if isinstance(value, Slice) else Slice(value)


# ---- small tensor helpers --------------------------------------------------------------------


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """Swap the last two axes."""
    return tensor.transpose(-1, -2)


def get_corner(tensor: torch.Tensor, n: int = 3) -> torch.Tensor:
    """The top-left corner: every axis cut to its first ``n`` entries."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


__all__ = ["Slice", "SliceInput", "as_slice", "get_act_name", "get_corner", "transpose"]
