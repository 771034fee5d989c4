"""OLMo 2: Llama-shaped, but post-norm: no norm before attention or the MLP, an RMSNorm on each
of their outputs before the residual add (TransformerLens calls them ln1 and ln2), and q/k
RMSNorms across all heads of the projected queries and keys."""

from __future__ import annotations

from typing import Any

import torch

from ..config import HookedConfig
from ._common import StateDict, bias_or_zeros, heads_in, heads_out, rotary_decoder_fields, unembed


def config_fields(hf: Any) -> dict[str, Any]:
    return rotary_decoder_fields(hf, final_rms=False)


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.model
    heads, kv_heads = cfg.n_heads, cfg.n_key_value_heads
    assert kv_heads is not None
    embed = body.embed_tokens.weight.detach()
    sd: StateDict = {"embed.W_E": embed}
    for layer, block in enumerate(body.layers):
        prefix, attn, mlp = f"blocks.{layer}", block.self_attn, block.mlp
        for name, linear, count in (
            ("Q", attn.q_proj, heads),
            ("K", attn.k_proj, kv_heads),
            ("V", attn.v_proj, kv_heads),
        ):
            sd[f"{prefix}.attn.W_{name}"] = heads_in(linear.weight.detach(), count)
            sd[f"{prefix}.attn.b_{name}"] = bias_or_zeros(linear, count * cfg.d_head, embed).view(
                count, -1
            )
        sd[f"{prefix}.attn.q_norm.w"] = attn.q_norm.weight.detach()
        sd[f"{prefix}.attn.k_norm.w"] = attn.k_norm.weight.detach()
        sd[f"{prefix}.attn.W_O"] = heads_out(attn.o_proj.weight.detach(), heads)
        sd[f"{prefix}.attn.b_O"] = bias_or_zeros(attn.o_proj, cfg.d_model, embed)
        sd[f"{prefix}.ln1.w"] = block.post_attention_layernorm.weight.detach()
        sd[f"{prefix}.mlp.W_gate"] = mlp.gate_proj.weight.detach().T
        sd[f"{prefix}.mlp.W_in"] = mlp.up_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=embed.dtype)
        sd[f"{prefix}.mlp.W_out"] = mlp.down_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=embed.dtype)
        sd[f"{prefix}.ln2.w"] = block.post_feedforward_layernorm.weight.detach()
    sd["ln_final.w"] = body.norm.weight.detach()
    unembed(model, sd, cfg.d_vocab_out)
    return sd
