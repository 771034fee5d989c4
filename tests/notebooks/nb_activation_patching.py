"""TransformerLens's *Activation Patching in TransformerLens Demo*: TransformerLens's own
``transformer_lens.patching`` functions, given the model, on the indirect-object task of
``nb_exploratory_analysis`` with its normalised logit-difference metric.

Each of these runs one forward per patched index (layers, positions, heads), so they are
the long sections of the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformer_lens.patching as patching

from .nb_exploratory_analysis import IOI, ioi_setup, logits_to_ave_logit_diff


def ioi_metric_for(model: Any, ioi: IOI) -> Callable[[torch.Tensor], torch.Tensor]:
    """The demo's metric: 1 when the clean logit difference is recovered, 0 at corrupted."""
    clean = logits_to_ave_logit_diff(ioi.logits, ioi.answer_tokens).item()
    corrupted = logits_to_ave_logit_diff(model(ioi.corrupted_tokens), ioi.answer_tokens).item()

    def ioi_metric(logits: torch.Tensor) -> torch.Tensor:
        diff = logits_to_ave_logit_diff(logits, ioi.answer_tokens)
        return (diff - corrupted) / (clean - corrupted)

    return ioi_metric


def residual_and_layer_outputs(model: Any) -> dict[str, Any]:
    """Patch the residual stream, the attention output and the MLP output of every layer at
    each position."""
    ioi = ioi_setup(model)
    metric = ioi_metric_for(model, ioi)
    tokens, cache = ioi.corrupted_tokens, ioi.cache
    return {
        "resid_pre": patching.get_act_patch_resid_pre(model, tokens, cache, metric),
        "attn_out": patching.get_act_patch_attn_out(model, tokens, cache, metric),
        "mlp_out": patching.get_act_patch_mlp_out(model, tokens, cache, metric),
    }


def attention_heads(model: Any) -> dict[str, Any]:
    """Patch head outputs position by position, then every head activation (output, query,
    key, value, pattern) over all positions."""
    ioi = ioi_setup(model)
    metric = ioi_metric_for(model, ioi)
    tokens, cache = ioi.corrupted_tokens, ioi.cache
    return {
        "head_out_by_pos": patching.get_act_patch_attn_head_out_by_pos(
            model, tokens, cache, metric
        ),
        "head_all_pos_every": patching.get_act_patch_attn_head_all_pos_every(
            model, tokens, cache, metric
        ),
    }


SECTIONS = (residual_and_layer_outputs, attention_heads)
