"""Phi-3: Llama-shaped (RMSNorm, rotary, gated SiLU MLP, grouped-query attention) with one fused
qkv projection and one fused gate/up projection; a sliding window on every layer when the
config sets one; partial rotary when ``partial_rotary_factor`` < 1 (Phi-4-mini)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import HookedConfig
from ._common import (
    StateDict,
    WeightBias,
    attention_windows,
    gated_decoder_weights,
    rotary_decoder_fields,
)


def config_fields(hf: Any) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None) or {}
    fraction = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    fields = rotary_decoder_fields(hf, **attention_windows(hf))
    fields["rotary_dim"] = int(fields["d_head"] * fraction)  # partial rotary (Phi-4-mini)
    return fields


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    return gated_decoder_weights(
        model,
        cfg,
        lambda block: {"ln1": block.input_layernorm, "ln2": block.post_attention_layernorm},
        qkv=_fused_qkv,
        gate_up=_fused_gate_up,
    )


def _fused_qkv(attn: Any, cfg: HookedConfig) -> list[WeightBias]:
    """Rows of the fused projection: all query heads, then the key heads, then the values."""
    assert cfg.n_key_value_heads is not None
    kv_rows = cfg.n_key_value_heads * cfg.d_head
    parts = attn.qkv_proj.weight.detach().split([cfg.n_heads * cfg.d_head, kv_rows, kv_rows])
    return [(weight, None) for weight in parts]


def _fused_gate_up(mlp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of gate_up_proj: the gate's, then the up projection's."""
    gate, up = mlp.gate_up_proj.weight.detach().chunk(2)
    return gate, up
