"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2): RMSNorm, rotary, gated SiLU MLP and
grouped-query attention; Qwen2 adds q/k/v biases, Qwen3 an RMSNorm on each query and key head
(``use_qk_norm``) and no biases."""

from __future__ import annotations

from typing import Any

from ..config import HookedConfig
from ._common import StateDict, attention_windows, gated_decoder_weights, rotary_decoder_fields


def config_fields(hf: Any) -> dict[str, Any]:
    architecture = (getattr(hf, "architectures", None) or [""])[0]
    return rotary_decoder_fields(
        hf,
        use_qk_norm=architecture.startswith("Qwen3"),
        default_prepend_bos=not architecture.startswith(("Qwen2", "Qwen3")),
        **attention_windows(hf),
    )


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    return gated_decoder_weights(
        model,
        cfg,
        lambda block: {"ln1": block.input_layernorm, "ln2": block.post_attention_layernorm},
    )
