"""The engine's model configuration, named after TransformerLens's ``HookedTransformerConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

NormalizationType = Literal["LN", "LNPre", "RMS", "RMSPre"]


@dataclass
class HookedConfig:
    """Shape and behaviour of a decoder-only transformer.

    Field names and meanings follow TransformerLens 3.9's ``HookedTransformerConfig`` so that
    ``model.cfg.<name>`` reads the same in both. Only the fields these architectures use exist.
    """

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    act_fn: str
    normalization_type: NormalizationType
    positional_embedding_type: Literal["standard", "rotary"]
    n_key_value_heads: int | None = None
    d_vocab_out: int = -1
    eps: float = 1e-5
    final_rms: bool = False
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    attn_only: bool = False
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    window_size: int | None = None
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool | None = None
    model_name: str = "custom"
    original_architecture: str | None = None
    tokenizer_name: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # Conditional hook points fire on every forward when these are set (TransformerLens's
    # setters); the engine also fires them for a single call when that call asks for them.
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    # Processing applied to the weights when they were loaded.
    processing: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        # Described as TransformerLens has it: None for architectures without grouped heads.
        self._kv_heads_given = self.n_key_value_heads is not None
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.rotary_dim is None and self.positional_embedding_type == "rotary":
            self.rotary_dim = self.d_head
        if self.attn_scale == -1.0:
            self.attn_scale = self.d_head**0.5 if self.use_attn_scale else 1.0
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads "
                f"({self.n_key_value_heads})"
            )

    @property
    def grouped_query(self) -> bool:
        return self.n_key_value_heads != self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (dtype as its name)."""
        out = asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        if not self._kv_heads_given:
            out["n_key_value_heads"] = None
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> HookedConfig:
        """The config ``to_dict`` described."""
        known = {spec.name for spec in dataclasses.fields(cls)}
        values = {name: value for name, value in fields.items() if name in known}
        values["dtype"] = getattr(torch, str(values.get("dtype", "float32")))
        return cls(**values)
