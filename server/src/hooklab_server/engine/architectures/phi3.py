"""Phi-3: Llama-shaped (RMSNorm, rotary, gated SiLU MLP, grouped-query attention) with one fused
qkv projection and one fused gate/up projection; a sliding window on every layer when the
config sets one; partial rotary when ``partial_rotary_factor`` < 1 (Phi-4-mini)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import HookedConfig
from ._common import (
    StateDict,
    attention_windows,
    heads_in,
    heads_out,
    rotary_decoder_fields,
    unembed,
)


def config_fields(hf: Any) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None) or {}
    fraction = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    fields = rotary_decoder_fields(hf, **attention_windows(hf))
    fields["rotary_dim"] = int(fields["d_head"] * fraction)  # partial rotary (Phi-4-mini)
    return fields


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.model
    heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    assert kv_heads is not None
    embed = body.embed_tokens.weight.detach()
    sd: StateDict = {"embed.W_E": embed}
    for layer, block in enumerate(body.layers):
        prefix, attn, mlp = f"blocks.{layer}", block.self_attn, block.mlp
        sd[f"{prefix}.ln1.w"] = block.input_layernorm.weight.detach()
        # Rows of the fused projection: all query heads, then the key heads, then the values.
        w_q, w_k, w_v = attn.qkv_proj.weight.detach().split(
            [heads * d_head, kv_heads * d_head, kv_heads * d_head]
        )
        for name, weight, count in (("Q", w_q, heads), ("K", w_k, kv_heads), ("V", w_v, kv_heads)):
            sd[f"{prefix}.attn.W_{name}"] = heads_in(weight, count)
            sd[f"{prefix}.attn.b_{name}"] = torch.zeros(count, d_head, dtype=embed.dtype)
        sd[f"{prefix}.attn.W_O"] = heads_out(attn.o_proj.weight.detach(), heads)
        sd[f"{prefix}.attn.b_O"] = torch.zeros(cfg.d_model, dtype=embed.dtype)
        sd[f"{prefix}.ln2.w"] = block.post_attention_layernorm.weight.detach()
        # Rows of gate_up_proj: the gate's, then the up projection's.
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2)
        sd[f"{prefix}.mlp.W_gate"] = gate.T
        sd[f"{prefix}.mlp.W_in"] = up.T
        sd[f"{prefix}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=embed.dtype)
        sd[f"{prefix}.mlp.W_out"] = mlp.down_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=embed.dtype)
    sd["ln_final.w"] = body.norm.weight.detach()
    unembed(model, sd, cfg.d_vocab_out)
    return sd
