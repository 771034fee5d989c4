"""TransformerLens's weight views: stacked ``W_Q`` [n_layers, n_heads, d_model, d_head] and friends,
and single parameters by their TransformerLens state-dict names (``blocks.3.attn.W_O``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch

from .config import HookedConfig

if TYPE_CHECKING:
    from .components.block import TransformerBlock

# At most six digits of layer: a longer number names no layer (and int() of 5,000 digits raises).
_BLOCK_PARAM = re.compile(r"^blocks\.(\d{1,6})\.(attn|mlp|ln1|ln2)\.(_?[Wbw]\w*)$")
_PER_LAYER = (
    *(f"attn.{name}" for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")),
    *(f"mlp.{name}" for name in ("W_in", "W_gate", "W_out", "b_in", "b_out")),
    "ln1.w", "ln1.b", "ln2.w", "ln2.b",
)  # fmt: skip

STACKED = (
    "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_gate", "W_out", "b_in", "b_out",
)  # fmt: skip
GLOBAL = ("W_E", "W_pos", "W_U", "b_U")


class WeightViews:
    """Mixed into the model. Biases the checkpoint lacks read as zeros, as in TransformerLens;
    grouped-query K/V are repeated to n_heads in the stacked views (``_W_K`` keeps kv heads)."""

    cfg: HookedConfig
    blocks: torch.nn.ModuleList

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.cfg.dtype, device=self.embed.W_E.device)  # type: ignore[attr-defined]

    def _block(self, layer: int) -> TransformerBlock:
        """``blocks[layer]``, typed (ModuleList indexing loses the element type)."""
        return cast("TransformerBlock", self.blocks[layer])

    def _layer_param(self, layer: int, module: str, name: str) -> torch.Tensor | None:
        """One layer's parameter in TransformerLens layout (``_W_K`` = unrepeated GQA keys)."""
        cfg, block = self.cfg, self._block(layer)
        heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        assert kv_heads is not None
        if module in ("ln1", "ln2"):
            norm = getattr(block, module)
            return {"w": norm.w, "b": norm.b}.get(name)
        if module == "attn":
            attn = block.attn
            grouped = name.startswith("_")
            base = name.lstrip("_")
            views: dict[str, Callable[[], torch.Tensor]] = {
                "W_Q": lambda: attn.W_Q,
                "W_K": lambda: attn.W_K,
                "W_V": lambda: attn.W_V,
                "W_O": lambda: attn.W_O,
                "b_Q": lambda: _bias(attn.b_q, heads, d_head, self._zeros),
                "b_K": lambda: _bias(attn.b_k, kv_heads, d_head, self._zeros),
                "b_V": lambda: _bias(attn.b_v, kv_heads, d_head, self._zeros),
                "b_O": lambda: attn.b_o if attn.b_o is not None else self._zeros(cfg.d_model),
            }
            if base not in views:
                return None
            value = views[base]()
            if base[-1] in "KV" and not grouped and kv_heads != heads:
                value = value.repeat_interleave(heads // kv_heads, dim=0)
            return value
        mlp = block.mlp
        mlp_views: dict[str, Callable[[], torch.Tensor | None]] = {
            "W_in": lambda: mlp.W_in,
            "W_gate": lambda: mlp.W_gate,
            "W_out": lambda: mlp.W_out,
            "b_in": lambda: mlp.b_in if mlp.b_in is not None else self._zeros(cfg.d_mlp),
            "b_out": lambda: mlp.b_out if mlp.b_out is not None else self._zeros(cfg.d_model),
        }
        return mlp_views[name]() if name in mlp_views else None

    def _output_bias(self, layer: int, module: str, name: str) -> torch.Tensor:
        """``b_O`` or ``b_out`` of one layer: never None (a missing bias reads as zeros)."""
        value = self._layer_param(layer, module, name)
        assert value is not None
        return value

    def _stacked(self, name: str) -> torch.Tensor | None:
        module = "mlp" if name in ("W_in", "W_gate", "W_out", "b_in", "b_out") else "attn"
        per_layer = [self._layer_param(layer, module, name) for layer in range(self.cfg.n_layers)]
        if any(value is None for value in per_layer):
            return None
        return torch.stack(per_layer)  # type: ignore[arg-type]

    def parameter(self, name: str) -> torch.Tensor:
        """A weight by TransformerLens name: a stacked property (``W_Q``), a global one (``W_U``),
        or a state-dict key (``blocks.0.attn._W_K``, ``ln_final.w``). KeyError if unknown."""
        if name in STACKED:
            value = self._stacked(name)
        elif name in GLOBAL or name in (
            "embed.W_E",
            "pos_embed.W_pos",
            "unembed.W_U",
            "unembed.b_U",
        ):
            value = getattr(self, name.split(".")[-1])
        elif name in ("ln_final.w", "ln_final.b"):
            value = getattr(self.ln_final, name[-1])  # type: ignore[attr-defined]
        elif match := _BLOCK_PARAM.match(name):
            layer, module, param = int(match[1]), match[2], match[3]
            value = self._layer_param(layer, module, param) if layer < self.cfg.n_layers else None
        else:
            value = None
        if value is None:
            raise KeyError(f"no parameter named {name!r}")
        return value.detach()

    def parameter_names(self, layer: int = 0) -> list[str]:
        """The names :meth:`parameter` answers for this model (per-layer ones for ``layer``)."""
        candidates = [
            *STACKED, *GLOBAL, "ln_final.w", "ln_final.b",
            *(f"blocks.{layer}.{name}" for name in _PER_LAYER),
        ]  # fmt: skip
        names = []
        for name in candidates:
            try:
                self.parameter(name)
            except KeyError:
                continue
            names.append(name)
        return names

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """Unembedding directions ``W_U[:, tokens]``, with d_model as the last axis."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)  # type: ignore[attr-defined]
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, tokens].movedim(0, -1)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        """Sum of the attention (and MLP) output biases written before ``layer`` [d_model]."""
        total = self._zeros(self.cfg.d_model)
        for index in range(layer):
            total = total + self._output_bias(index, "attn", "b_O")
            if include_mlp_biases:
                total = total + self._output_bias(index, "mlp", "b_out")
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError("mlp_input needs a layer below n_layers")
            total = total + self._output_bias(layer, "attn", "b_O")
        return total

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.W_E  # type: ignore[attr-defined]

    @property
    def W_pos(self) -> torch.Tensor | None:
        pos_embed = self.pos_embed  # type: ignore[attr-defined]
        return None if pos_embed is None else pos_embed.W_pos

    @property
    def W_U(self) -> torch.Tensor:
        return self.unembed.W_U  # type: ignore[attr-defined]

    @property
    def b_U(self) -> torch.Tensor:
        b_u = self.unembed.b_u  # type: ignore[attr-defined]
        return b_u if b_u is not None else self._zeros(self.cfg.d_vocab_out)


def _bias(
    bias: torch.Tensor | None, heads: int, d_head: int, zeros: Callable[..., torch.Tensor]
) -> torch.Tensor:
    return zeros(heads, d_head) if bias is None else bias.view(heads, d_head)


def _stacked_property(name: str) -> property:
    return property(lambda self: self._stacked(name), doc=f"{name} for every layer, stacked.")


for _name in STACKED:
    setattr(WeightViews, _name, _stacked_property(_name))
