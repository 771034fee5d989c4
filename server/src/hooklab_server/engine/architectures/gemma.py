"""Gemma 1, 2 and 3 (text): embeddings scaled by sqrt(d_model), RMSNorm by (1 + w), GeGLU MLP
(tanh GELU), grouped- or multi-query attention, no biases, tied unembedding.

Gemma 2 adds norms after attention and MLP (ln1_post, ln2_post), sliding-window layers
alternating with global ones, attention scores scaled by 1/sqrt(query_pre_attn_scalar), and
tanh soft-capping of the attention scores and the final logits. Gemma 3 drops the soft-caps,
adds an RMSNorm on each query and key head, and gives the sliding layers a rotary base of
their own (the global layers' may be scaled: linear, factor 8, from the 4B model up). As
TransformerLens does, the embedding is stored pre-multiplied and every norm gain as ``1 + w``.
"""

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
    norm_weight,
    rope_fields,
    rope_params,
    rotary_decoder_fields,
    unembed,
)


def config_fields(hf: Any) -> dict[str, Any]:
    generation = _generation(hf)
    if generation < 3:
        fields = rotary_decoder_fields(hf)
    else:  # Gemma 3: one set of rope parameters per layer type
        rope = rope_params(hf)
        local = rope_fields(rope["sliding_attention"], hf)
        if len(local) > 1:  # TransformerLens, too, scales only the global layers
            raise NotImplementedError(
                f"rope_type {rope['sliding_attention'].get('rope_type')!r} on Gemma 3's "
                "sliding layers is not supported (only their own base, unscaled)"
            )
        fields = rotary_decoder_fields(
            hf, use_qk_norm=True, rotary_base_local=local["rotary_base"],
            **rope_fields(rope["full_attention"], hf),
        )  # fmt: skip
    if generation > 1:
        fields.update(
            attn_scale=hf.query_pre_attn_scalar**0.5,
            use_normalization_before_and_after=True,
            attn_scores_soft_cap=hf.attn_logit_softcapping or -1.0,
            output_logits_soft_cap=hf.final_logit_softcapping or -1.0,
            **attention_windows(hf),
        )
    return fields


def _generation(hf: Any) -> int:
    model_type = hf.model_type
    return 3 if model_type.startswith("gemma3") else 2 if model_type == "gemma2" else 1


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.model
    heads, kv_heads = cfg.n_heads, cfg.n_key_value_heads
    assert kv_heads is not None
    embed = body.embed_tokens.weight.detach()
    sd: StateDict = {"embed.W_E": embed * torch.tensor(cfg.d_model**0.5, dtype=embed.dtype)}
    after = cfg.use_normalization_before_and_after
    for layer, block in enumerate(body.layers):
        prefix, attn, mlp = f"blocks.{layer}", block.self_attn, block.mlp
        sd[f"{prefix}.ln1.w"] = norm_weight(block.input_layernorm, plus_one=True)
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
            sd[f"{prefix}.attn.q_norm.w"] = norm_weight(attn.q_norm, plus_one=True)
            sd[f"{prefix}.attn.k_norm.w"] = norm_weight(attn.k_norm, plus_one=True)
        sd[f"{prefix}.attn.W_O"] = heads_out(attn.o_proj.weight.detach(), heads)
        sd[f"{prefix}.attn.b_O"] = bias_or_zeros(attn.o_proj, cfg.d_model, embed)
        if after:  # Gemma 2/3: post_attention_layernorm normalises the attention output
            sd[f"{prefix}.ln1_post.w"] = norm_weight(block.post_attention_layernorm, True)
            sd[f"{prefix}.ln2.w"] = norm_weight(block.pre_feedforward_layernorm, True)
            sd[f"{prefix}.ln2_post.w"] = norm_weight(block.post_feedforward_layernorm, True)
        else:  # Gemma 1: post_attention_layernorm is the MLP's input norm
            sd[f"{prefix}.ln2.w"] = norm_weight(block.post_attention_layernorm, True)
        sd[f"{prefix}.mlp.W_gate"] = mlp.gate_proj.weight.detach().T
        sd[f"{prefix}.mlp.W_in"] = mlp.up_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=embed.dtype)
        sd[f"{prefix}.mlp.W_out"] = mlp.down_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=embed.dtype)
    sd["ln_final.w"] = norm_weight(body.norm, plus_one=True)
    unembed(model, sd, cfg.d_vocab_out)
    return sd
