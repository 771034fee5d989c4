"""Load a Hugging Face checkpoint (hub name, local folder or .gguf file) into the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .architectures import family
from .compiled import enable_compile
from .components.fused import share_rows
from .components.norm import Norm
from .config import HookedConfig
from .default_model import resolve_model_source
from .model import HookedTransformer
from .processing import StateDict, process_weights
from .tokenization import tokenizer_prepends_bos, tokenizer_with_bos


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_hf(name_or_path: str | Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """The Hugging Face model (float32, CPU) and tokenizer behind a name, folder or .gguf file."""
    path = Path(name_or_path)
    kwargs: dict[str, Any] = {}
    source: str | Path = name_or_path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        source, kwargs = path.parent, {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """TransformerLens's fallbacks: pad = eos and bos = eos when the tokenizer has none."""
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|endoftext|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def _linear(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(weight.contiguous(), requires_grad=False)


def _bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A bias parameter, or None when it is absent or all zeros (adding zeros is wasted work)."""
    if bias is None or not bool(bias.any()):
        return None
    return nn.Parameter(bias.reshape(-1).contiguous(), requires_grad=False)


def assign_weights(model: HookedTransformer, sd: StateDict) -> None:
    """Copy a TransformerLens-layout state dict into the model's linear-layout parameters."""
    cfg = model.cfg
    model.embed.W_E = _linear(sd["embed.W_E"])
    if model.pos_embed is not None:
        model.pos_embed.W_pos = _linear(sd["pos_embed.W_pos"])
    for layer in range(len(model.blocks)):
        block = model._block(layer)
        prefix = f"blocks.{layer}"
        norms = (
            (block.ln1, "ln1"), (block.ln2, "ln2"), (block.ln1_post, "ln1_post"),
            (block.ln2_post, "ln2_post"), (block.attn.q_norm, "attn.q_norm"),
            (block.attn.k_norm, "attn.k_norm"),
        )  # fmt: skip
        for norm, name in norms:
            if norm is not None:
                _assign_norm(norm, sd, f"{prefix}.{name}")
        attn = block.attn
        attn.w_q = _linear(sd[f"{prefix}.attn.W_Q"].transpose(1, 2).reshape(-1, cfg.d_model))
        attn.w_k = _linear(sd[f"{prefix}.attn.W_K"].transpose(1, 2).reshape(-1, cfg.d_model))
        attn.w_v = _linear(sd[f"{prefix}.attn.W_V"].transpose(1, 2).reshape(-1, cfg.d_model))
        attn.w_o = _linear(sd[f"{prefix}.attn.W_O"].reshape(-1, cfg.d_model).T)
        attn.b_q, attn.b_k, attn.b_v, attn.b_o = (
            _bias(sd.get(f"{prefix}.attn.b_{name}")) for name in "QKVO"
        )
        mlp = block.mlp
        mlp.w_in = _linear(sd[f"{prefix}.mlp.W_in"].T)
        if cfg.gated_mlp:
            mlp.w_gate = _linear(sd[f"{prefix}.mlp.W_gate"].T)
        mlp.w_out = _linear(sd[f"{prefix}.mlp.W_out"].T)
        mlp.b_in, mlp.b_out = (
            _bias(sd.get(f"{prefix}.mlp.b_in")),
            _bias(sd.get(f"{prefix}.mlp.b_out")),
        )
        share_rows(attn, ("w_q", "w_k", "w_v"))  # the fused q/k/v weight is a view
        share_rows(attn, ("b_q", "b_k", "b_v"))
        if cfg.gated_mlp:
            share_rows(mlp, ("w_gate", "w_in"))
    _assign_norm(model.ln_final, sd, "ln_final")
    model.unembed.w_u = _linear(sd["unembed.W_U"].T)
    model.unembed.b_u = _bias(sd.get("unembed.b_U"))


def _assign_norm(norm: Norm, sd: StateDict, prefix: str) -> None:
    if norm.w is not None:
        norm.w = nn.Parameter(sd[f"{prefix}.w"].contiguous(), requires_grad=False)
    if norm.b is not None:
        norm.b = nn.Parameter(sd[f"{prefix}.b"].contiguous(), requires_grad=False)


def from_hf(
    hf_model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    model_name: str = "custom",
) -> HookedTransformer:
    """Build the engine from an already loaded Hugging Face causal LM."""
    hf_config = hf_model.config
    architecture = (getattr(hf_config, "architectures", None) or [type(hf_model).__name__])[0]
    fam = family(architecture)
    device = resolve_device(device)
    prepends_bos = None
    if tokenizer is not None:
        # TransformerLens's set_tokenizer, in its order: the tokenizer that adds the BOS, whether
        # it does (read before the fallbacks fill in a missing BOS), then the fallbacks.
        tokenizer = tokenizer_with_bos(tokenizer, architecture)
        prepends_bos = tokenizer_prepends_bos(tokenizer)
        tokenizer = prepare_tokenizer(tokenizer)
    cfg = HookedConfig(
        **fam.config_fields(hf_config),
        d_vocab_out=hf_model.get_output_embeddings().weight.shape[0],
        model_name=model_name,
        original_architecture=architecture,
        tokenizer_name=model_name,
        tokenizer_prepends_bos=prepends_bos,
        device=str(device),
        dtype=dtype,
    )
    sd = process_weights(
        fam.weights(hf_model, cfg),
        cfg,
        fold_ln,
        center_writing_weights,
        center_unembed,
        fold_value_biases,
    )
    model = HookedTransformer(cfg, tokenizer)
    assign_weights(model, sd)
    return model.to(device=device, dtype=dtype)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    compile: bool = False,
) -> HookedTransformer:
    """TransformerLens's ``from_pretrained``: load and process (all four steps on by default).

    ``name_or_path`` is a hub name, a local checkpoint folder, a ``.gguf`` file, or
    ``SmolLM2-135M-Instruct`` (the offline demo model, dequantised once into the user cache).
    ``compile``: run the blocks no hook touches through ``torch.compile`` (``compiled.py``),
    compiled and warmed up here.
    """
    hf_model, tokenizer = load_hf(resolve_model_source(name_or_path))
    model = from_hf(
        hf_model, tokenizer, device, dtype, fold_ln, center_writing_weights, center_unembed,
        fold_value_biases, model_name=str(name_or_path),
    )  # fmt: skip
    if compile:
        enable_compile(model)
    return model


def load_model_no_processing(
    name_or_path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """TransformerLens's ``from_pretrained_no_processing``: the checkpoint's weights as they are."""
    return load_model(name_or_path, device, dtype, False, False, False, False)
