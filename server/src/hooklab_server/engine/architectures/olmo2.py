"""OLMo 2: Llama-shaped, but post-norm: no norm before attention or the MLP, an RMSNorm on each
of their outputs before the residual add (TransformerLens calls them ln1 and ln2), and q/k
RMSNorms across all heads of the projected queries and keys."""

from __future__ import annotations

from typing import Any

from ..config import HookedConfig
from ._common import StateDict, gated_decoder_weights, rotary_decoder_fields


def config_fields(hf: Any) -> dict[str, Any]:
    return rotary_decoder_fields(hf, final_rms=False)


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    # Post-norm: TransformerLens's ln1/ln2 are the norms on the attention and MLP outputs.
    return gated_decoder_weights(
        model,
        cfg,
        lambda block: {
            "ln1": block.post_attention_layernorm,
            "ln2": block.post_feedforward_layernorm,
        },
    )
