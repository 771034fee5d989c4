"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2): RMSNorm, rotary, gated SiLU MLP and
grouped-query attention; Qwen2 adds q/k/v biases, Qwen3 an RMSNorm on each query and key head
(``use_qk_norm``) and no biases."""

from __future__ import annotations

from typing import Any

import torch

from ..config import HookedConfig
from ._common import (
    StateDict,
    attention_windows,
    bias_or_zeros,
    heads_in,
    heads_out,
    rotary_decoder_fields,
    unembed,
)


def config_fields(hf: Any) -> dict[str, Any]:
    architecture = (getattr(hf, "architectures", None) or [""])[0]
    return rotary_decoder_fields(
        hf,
        use_qk_norm=architecture.startswith("Qwen3"),
        default_prepend_bos=not architecture.startswith(("Qwen2", "Qwen3")),
        **attention_windows(hf),
    )


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.model
    heads, kv_heads = cfg.n_heads, cfg.n_key_value_heads
    assert kv_heads is not None
    embed = body.embed_tokens.weight.detach()
    sd: StateDict = {"embed.W_E": embed}
    zeros = torch.zeros(cfg.d_model, dtype=embed.dtype)
    for layer, block in enumerate(body.layers):
        prefix, attn, mlp = f"blocks.{layer}", block.self_attn, block.mlp
        sd[f"{prefix}.ln1.w"] = block.input_layernorm.weight.detach()
        for name, linear, count in (
            ("Q", attn.q_proj, heads),
            ("K", attn.k_proj, kv_heads),
            ("V", attn.v_proj, kv_heads),
        ):
            sd[f"{prefix}.attn.W_{name}"] = heads_in(linear.weight.detach(), count)
            sd[f"{prefix}.attn.b_{name}"] = bias_or_zeros(linear, count * cfg.d_head, embed).view(
                count, -1
            )
        if cfg.use_qk_norm:
            sd[f"{prefix}.attn.q_norm.w"] = attn.q_norm.weight.detach()
            sd[f"{prefix}.attn.k_norm.w"] = attn.k_norm.weight.detach()
        sd[f"{prefix}.attn.W_O"] = heads_out(attn.o_proj.weight.detach(), heads)
        sd[f"{prefix}.attn.b_O"] = bias_or_zeros(attn.o_proj, cfg.d_model, embed)
        sd[f"{prefix}.ln2.w"] = block.post_attention_layernorm.weight.detach()
        sd[f"{prefix}.mlp.W_gate"] = mlp.gate_proj.weight.detach().T
        sd[f"{prefix}.mlp.W_in"] = mlp.up_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=embed.dtype)
        sd[f"{prefix}.mlp.W_out"] = mlp.down_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = zeros
    sd["ln_final.w"] = body.norm.weight.detach()
    unembed(model, sd, cfg.d_vocab_out)
    return sd
