"""Hugging Face checkpoint -> (config, TransformerLens-layout state dict), one family per module.

Each family module exposes ``config_fields(hf_config) -> dict`` (HookedConfig keyword
arguments) and ``weights(hf_model, cfg) -> StateDict``.
"""

from __future__ import annotations

from types import ModuleType

from . import gemma, gpt2, llama, neox, olmo2, phi3

FAMILIES: dict[str, ModuleType] = {
    "GPT2LMHeadModel": gpt2,
    "GPTNeoXForCausalLM": neox,
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": llama,
    "Qwen3ForCausalLM": llama,
    "Olmo2ForCausalLM": olmo2,
    "GemmaForCausalLM": gemma,
    "Gemma2ForCausalLM": gemma,
    "Gemma3ForCausalLM": gemma,
    "Phi3ForCausalLM": phi3,
}


def family(architecture: str) -> ModuleType:
    try:
        return FAMILIES[architecture]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {supported}"
        ) from None
