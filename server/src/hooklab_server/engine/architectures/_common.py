"""Helpers shared by the family converters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import HookedConfig

StateDict = dict[str, torch.Tensor]
# A projection's weight (nn.Linear layout) and its bias, None where it has none.
WeightBias = tuple[torch.Tensor, torch.Tensor | None]


def heads_in(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """An ``nn.Linear`` weight [heads * d_head, d_model] as [heads, d_model, d_head]."""
    return weight.view(heads, -1, weight.shape[-1]).transpose(1, 2)


def heads_out(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """An output ``nn.Linear`` weight [d_model, heads * d_head] as [heads, d_head, d_model]."""
    return weight.T.reshape(heads, -1, weight.shape[0])


def bias_or_zeros(linear: Any, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(linear, "bias", None)
    return bias.detach() if bias is not None else torch.zeros(size, dtype=like.dtype)


def rope_params(hf_config: Any) -> dict[str, Any]:
    """The rope parameters of a transformers 5 (``rope_parameters``) or 4 (``rope_scaling``)
    config; per layer type for Gemma 3 (``{"full_attention": {...}, ...}``)."""
    return dict(
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type")) or "default"


def rope_theta(hf_config: Any, default: float = 10000.0) -> float:
    """rope_theta from a transformers 4 or 5 config, for families that run only plain rotary:
    a scaled one is refused rather than silently run unscaled."""
    params = rope_params(hf_config)
    if _rope_type(params) != "default":
        raise NotImplementedError(
            f"rope_type {_rope_type(params)!r} is not supported for this architecture "
            "(only plain rotary)"
        )
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", default)))


def rope_fields(params: dict[str, Any], hf: Any, default_base: float = 10000.0) -> dict[str, Any]:
    """``rotary_base`` and the scaling fields of one set of rope parameters, read with
    transformers' semantics (``modeling_rope_utils``): default, linear, llama3, yarn and
    longrope; any other type (dynamic …) is refused by name, never run unscaled."""
    rope_type = _rope_type(params)
    fields: dict[str, Any] = {
        "rotary_base": float(params.get("rope_theta", getattr(hf, "rope_theta", default_base)))
    }
    # HF falls back to the config's own original length (Phi-3 keeps it there).
    original = (
        params.get("original_max_position_embeddings")
        or getattr(hf, "original_max_position_embeddings", None)
        or hf.max_position_embeddings
    )
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        fields["rotary_scaling_factor"] = float(params["factor"])
    elif rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(params["factor"]),
            NTK_by_parts_low_freq_factor=float(params["low_freq_factor"]),
            NTK_by_parts_high_freq_factor=float(params["high_freq_factor"]),
            NTK_original_ctx_len=int(original),
        )
    elif rope_type == "longrope":
        # Without a factor HF takes the context extension ratio; the attention factor then
        # defaults to sqrt(1 + ln(factor) / ln(original)) (1 when nothing is extended).
        factor = params.get("factor") or hf.max_position_embeddings / original
        attention = params.get("attention_factor")
        if attention is None:
            stretch = math.log(factor) / math.log(original)
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + stretch)
        fields.update(
            longrope_short_factor=[float(value) for value in params["short_factor"]],
            longrope_long_factor=[float(value) for value in params["long_factor"]],
            longrope_original_ctx_len=int(original),
            longrope_attention_factor=float(attention),
        )
    elif rope_type == "yarn":
        factor = params.get("factor") or hf.max_position_embeddings / original
        attention = params.get("attention_factor")
        if attention is None:  # HF: 0.1 ln(factor) + 1, or the ratio of two such with mscales
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention = _yarn_mscale(factor)
        fields.update(
            use_yarn_rope=True,
            yarn_factor=float(factor),
            yarn_attention_factor=float(attention),
            yarn_beta_fast=float(params.get("beta_fast") or 32.0),
            yarn_beta_slow=float(params.get("beta_slow") or 1.0),
            yarn_original_max_position_embeddings=int(original),
            yarn_truncate=bool(params.get("truncate", True)),
        )
    else:
        raise NotImplementedError(
            f"rope_type {rope_type!r} (rope_scaling) is not supported: hooklab runs default, "
            "linear, llama3, yarn and longrope rotary embeddings"
        )
    return fields


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_decoder_fields(hf: Any, **overrides: Any) -> dict[str, Any]:
    """The config fields every rotary, RMS-normed, gated-MLP decoder shares (Llama, Qwen,
    Mistral, OLMo 2, Phi-3, Gemma), read from its transformers config; ``overrides`` are the
    family's own (the rotary base and scaling are read from the config only when they do not
    give a base)."""
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
    if "rotary_base" not in overrides:  # one set of rope parameters for every layer
        fields.update(rope_fields(rope_params(hf), hf))
    fields.update(overrides)
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


def separate_qkv(attn: Any, cfg: HookedConfig) -> list[WeightBias]:
    """Query, key and value weights and biases of three ``q_proj``/``k_proj``/``v_proj``."""
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    return [(linear.weight.detach(), _bias(linear)) for linear in linears]


def separate_gate_up(mlp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up weights of a ``gate_proj`` and an ``up_proj``."""
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()


def _bias(linear: Any) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return bias.detach() if bias is not None else None


def gated_decoder_weights(
    model: Any,
    cfg: HookedConfig,
    norms: Callable[[Any], dict[str, Any]],
    *,
    plus_one: bool = False,
    qkv: Callable[[Any, HookedConfig], list[WeightBias]] = separate_qkv,
    gate_up: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = separate_gate_up,
) -> StateDict:
    """TransformerLens's state dict of a rotary, gated-MLP decoder (Llama, Qwen, Mistral,
    OLMo 2, Gemma, Phi-3). What differs by family is given: ``norms`` maps a layer to its norms
    by TransformerLens name (``ln1``, ``ln2``, ``ln1_post`` …), ``plus_one`` stores gains as
    ``1 + w`` (Gemma), ``qkv`` and ``gate_up`` read fused projections (Phi-3). Missing biases
    are zeros; the q/k norms are read when the config has them."""
    body = model.model
    embed = body.embed_tokens.weight.detach()
    sd: StateDict = {"embed.W_E": embed}
    assert cfg.n_key_value_heads is not None
    counts = (cfg.n_heads, cfg.n_key_value_heads, cfg.n_key_value_heads)
    for layer, block in enumerate(body.layers):
        prefix, attn, mlp = f"blocks.{layer}", block.self_attn, block.mlp
        for name, norm in norms(block).items():
            sd[f"{prefix}.{name}.w"] = norm_weight(norm, plus_one)
        for name, (weight, bias), count in zip("QKV", qkv(attn, cfg), counts, strict=True):
            sd[f"{prefix}.attn.W_{name}"] = heads_in(weight, count)
            sd[f"{prefix}.attn.b_{name}"] = (
                bias.view(count, -1)
                if bias is not None
                else torch.zeros(count, cfg.d_head, dtype=embed.dtype)
            )
        if cfg.use_qk_norm or cfg.post_norm:  # per head (Qwen3, Gemma 3), all heads (OLMo 2)
            sd[f"{prefix}.attn.q_norm.w"] = norm_weight(attn.q_norm, plus_one)
            sd[f"{prefix}.attn.k_norm.w"] = norm_weight(attn.k_norm, plus_one)
        sd[f"{prefix}.attn.W_O"] = heads_out(attn.o_proj.weight.detach(), cfg.n_heads)
        sd[f"{prefix}.attn.b_O"] = bias_or_zeros(attn.o_proj, cfg.d_model, embed)
        gate, up = gate_up(mlp)
        sd[f"{prefix}.mlp.W_gate"] = gate.T
        sd[f"{prefix}.mlp.W_in"] = up.T
        sd[f"{prefix}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=embed.dtype)
        sd[f"{prefix}.mlp.W_out"] = mlp.down_proj.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=embed.dtype)
    sd["ln_final.w"] = norm_weight(body.norm, plus_one)
    unembed(model, sd, cfg.d_vocab_out)
    return sd
