"""Helpers shared by the family converters."""

from __future__ import annotations

from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


def heads_in(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """An ``nn.Linear`` weight [heads * d_head, d_model] as [heads, d_model, d_head]."""
    return weight.view(heads, -1, weight.shape[-1]).transpose(1, 2)


def heads_out(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """An output ``nn.Linear`` weight [d_model, heads * d_head] as [heads, d_head, d_model]."""
    return weight.T.reshape(heads, -1, weight.shape[0])


def bias_or_zeros(linear: Any, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(linear, "bias", None)
    return bias.detach() if bias is not None else torch.zeros(size, dtype=like.dtype)


def rope_theta(hf_config: Any, default: float = 10000.0) -> float:
    """rope_theta from a transformers 4 or 5 config; only plain rotary is supported."""
    params = (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported yet (only plain rotary)"
        )
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", default)))


def rotary_decoder_fields(hf: Any, **overrides: Any) -> dict[str, Any]:
    """The config fields every rotary, RMS-normed, gated-MLP decoder shares (Llama, Qwen,
    Mistral, OLMo 2, Phi-3, Gemma), read from its transformers config; ``overrides`` are the
    family's own (the rotary base is read from the config only when they do not give it)."""
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    fields: dict[str, Any] = dict(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_ctx=hf.max_position_embeddings,
        n_heads=hf.num_attention_heads,
        n_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        act_fn=getattr(hf, "hidden_activation", None) or hf.hidden_act,  # Gemma: the former
        eps=hf.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        gated_mlp=True,
    )
    fields.update(overrides)
    if "rotary_base" not in fields:
        fields["rotary_base"] = rope_theta(hf)
    return fields


def unembed(model: Any, sd: StateDict, d_vocab_out: int) -> None:
    w_u = model.get_output_embeddings().weight.detach()  # [d_vocab, d_model]
    sd["unembed.W_U"] = w_u.T
    bias = getattr(model.get_output_embeddings(), "bias", None)
    sd["unembed.b_U"] = (
        bias.detach() if bias is not None else torch.zeros(d_vocab_out, dtype=w_u.dtype)
    )


def attention_windows(hf_config: Any) -> dict[str, Any]:
    """``window_size``, ``use_local_attn`` and ``attn_types`` from a config's sliding window and
    ``layer_types``: no window; a window on every layer (Mistral, Phi-3: no ``layer_types``); or
    on the layers typed "sliding_attention" (Gemma 2/3, Qwen3)."""
    window = getattr(hf_config, "sliding_window", None)
    if not getattr(hf_config, "use_sliding_window", True):
        window = None
    if window is None:
        return {}
    layer_types = getattr(hf_config, "layer_types", None)
    attn_types = None
    if layer_types is not None:
        attn_types = ["local" if kind == "sliding_attention" else "global" for kind in layer_types]
    return dict(window_size=window, use_local_attn=True, attn_types=attn_types)


def norm_weight(norm: Any, plus_one: bool = False) -> torch.Tensor:
    """A norm's gain; Gemma's RMSNorm multiplies by ``1 + weight``, stored here as that sum (in
    float32, as TransformerLens does)."""
    weight = norm.weight.detach()
    return weight.float() + 1.0 if plus_one else weight
