"""GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, Conv1D weights stored [in, out]."""

from __future__ import annotations

from typing import Any

from ..config import HookedConfig
from ._common import StateDict, unembed


def config_fields(hf: Any) -> dict[str, Any]:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(
        hf, "reorder_and_upcast_attn", False
    ):
        raise NotImplementedError(
            "GPT-2 variants with per-layer attention scaling are not supported"
        )
    return dict(
        n_layers=hf.n_layer,
        d_model=hf.n_embd,
        n_ctx=hf.n_positions,
        n_heads=hf.n_head,
        d_head=hf.n_embd // hf.n_head,
        d_mlp=hf.n_inner or 4 * hf.n_embd,
        d_vocab=hf.vocab_size,
        act_fn=hf.activation_function,
        eps=hf.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=True,
    )


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.transformer
    heads, d_model = cfg.n_heads, cfg.d_model
    sd: StateDict = {
        "embed.W_E": body.wte.weight.detach(),
        "pos_embed.W_pos": body.wpe.weight.detach(),
    }
    for layer, block in enumerate(body.h):
        prefix = f"blocks.{layer}"
        sd[f"{prefix}.ln1.w"], sd[f"{prefix}.ln1.b"] = (
            block.ln_1.weight.detach(),
            block.ln_1.bias.detach(),
        )
        qkv = block.attn.c_attn.weight.detach()  # [d_model, 3 * d_model]
        qkv_bias = block.attn.c_attn.bias.detach()
        for index, name in enumerate("QKV"):
            w = qkv[:, index * d_model : (index + 1) * d_model]
            sd[f"{prefix}.attn.W_{name}"] = w.reshape(d_model, heads, -1).permute(1, 0, 2)
            sd[f"{prefix}.attn.b_{name}"] = qkv_bias[
                index * d_model : (index + 1) * d_model
            ].reshape(heads, -1)
        sd[f"{prefix}.attn.W_O"] = block.attn.c_proj.weight.detach().reshape(heads, -1, d_model)
        sd[f"{prefix}.attn.b_O"] = block.attn.c_proj.bias.detach()
        sd[f"{prefix}.ln2.w"], sd[f"{prefix}.ln2.b"] = (
            block.ln_2.weight.detach(),
            block.ln_2.bias.detach(),
        )
        sd[f"{prefix}.mlp.W_in"] = block.mlp.c_fc.weight.detach()  # Conv1D: already [in, out]
        sd[f"{prefix}.mlp.b_in"] = block.mlp.c_fc.bias.detach()
        sd[f"{prefix}.mlp.W_out"] = block.mlp.c_proj.weight.detach()
        sd[f"{prefix}.mlp.b_out"] = block.mlp.c_proj.bias.detach()
    sd["ln_final.w"], sd["ln_final.b"] = body.ln_f.weight.detach(), body.ln_f.bias.detach()
    unembed(model, sd, cfg.d_vocab_out)
    return sd
