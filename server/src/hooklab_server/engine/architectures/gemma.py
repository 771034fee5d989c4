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

from collections.abc import Callable
from typing import Any

import torch

from ..config import HookedConfig
from ._common import (
    StateDict,
    attention_windows,
    gated_decoder_weights,
    rope_fields,
    rope_params,
    rotary_decoder_fields,
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
    sd = gated_decoder_weights(model, cfg, _norms(cfg), plus_one=True)
    embed = sd["embed.W_E"]
    sd["embed.W_E"] = embed * torch.tensor(cfg.d_model**0.5, dtype=embed.dtype)
    return sd


def _norms(cfg: HookedConfig) -> Callable[[Any], dict[str, Any]]:
    if cfg.use_normalization_before_and_after:  # Gemma 2/3: a norm before and after each
        return lambda block: {
            "ln1": block.input_layernorm,
            "ln1_post": block.post_attention_layernorm,
            "ln2": block.pre_feedforward_layernorm,
            "ln2_post": block.post_feedforward_layernorm,
        }
    # Gemma 1: post_attention_layernorm is the MLP's input norm
    return lambda block: {"ln1": block.input_layernorm, "ln2": block.post_attention_layernorm}
