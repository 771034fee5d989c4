"""The engine's model configuration, named after TransformerLens's ``HookedTransformerConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

NormalizationType = Literal["LN", "LNPre", "RMS", "RMSPre"]

# Post-norm decoders (TransformerLens's POST_NORM_ARCHITECTURES, those the engine loads).
POST_NORM_ARCHITECTURES = frozenset({"Olmo2ForCausalLM"})


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
    # Sliding-window attention: every layer (Mistral: attn_types None) or the "local" ones of
    # attn_types (Gemma 2/3: ["local", "global", ...]); keys further back than the window are
    # masked (key > query - window_size stays).
    window_size: int | None = None
    use_local_attn: bool = False
    attn_types: list[str] | None = None
    rotary_base_local: float | None = None  # Gemma 3: the local layers' rotary base
    # Scaled rotary (HF's rope_scaling; components/rotary.py), in TransformerLens's names where
    # it has them. linear: the non-local layers' angles divided by rotary_scaling_factor.
    rotary_scaling_factor: float = 1.0
    # llama3 (TL: "NTK by parts"): low frequencies divided by the factor, high ones kept.
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_factor: float = 8.0
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_original_ctx_len: int = 8192
    # yarn: frequencies blended between divided by yarn_factor (below the correction range) and
    # kept (above it); cos and sin times yarn_attention_factor.
    use_yarn_rope: bool = False
    yarn_factor: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_truncate: bool = True
    # longrope (Phi-3; not in TransformerLens): a divisor per frequency, the long set once a
    # forward reaches past longrope_original_ctx_len positions; cos and sin times the factor.
    longrope_short_factor: list[float] | None = None
    longrope_long_factor: list[float] | None = None
    longrope_original_ctx_len: int | None = None
    longrope_attention_factor: float = 1.0
    # c * tanh(x / c) on the attention scores / the logits; -1: off (Gemma 2).
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    # Gemma 2/3: norms after attention and MLP too (ln1_post, ln2_post), before the residual add.
    use_normalization_before_and_after: bool = False
    # Qwen3, Gemma 3: an RMSNorm over d_head on each query and key head (attn.q_norm, k_norm).
    use_qk_norm: bool = False
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
    # Sparse autoencoders attached (not in TransformerLens): d_sae by the hook point they read.
    sae_widths: dict[str, int] = field(default_factory=dict)

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
        if self.attn_types is not None and len(self.attn_types) != self.n_layers:
            raise ValueError(
                f"attn_types has {len(self.attn_types)} entries for {self.n_layers} layers"
            )
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads "
                f"({self.n_key_value_heads})"
            )

    @property
    def grouped_query(self) -> bool:
        return self.n_key_value_heads != self.n_heads

    @property
    def post_norm(self) -> bool:
        """OLMo 2: no norm before attention or MLP; ln1 and ln2 normalise their outputs before
        the residual add, and q_norm/k_norm act on all heads at once (TransformerLens keys these
        on the architecture too)."""
        return self.original_architecture in POST_NORM_ARCHITECTURES

    def layer_window(self, layer: int) -> int | None:
        """The attention window of a layer; None: global attention."""
        if self.attn_types is None or self.attn_types[layer] == "local":
            return self.window_size
        return None

    def layer_rotary_base(self, layer: int) -> float:
        if self.rotary_base_local is not None and self.layer_window(layer) is not None:
            return self.rotary_base_local
        return self.rotary_base

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
