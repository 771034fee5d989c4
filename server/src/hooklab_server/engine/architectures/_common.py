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


def unembed(model: Any, sd: StateDict, d_vocab_out: int) -> None:
    w_u = model.get_output_embeddings().weight.detach()  # [d_vocab, d_model]
    sd["unembed.W_U"] = w_u.T
    bias = getattr(model.get_output_embeddings(), "bias", None)
    sd["unembed.b_U"] = (
        bias.detach() if bias is not None else torch.zeros(d_vocab_out, dtype=w_u.dtype)
    )
