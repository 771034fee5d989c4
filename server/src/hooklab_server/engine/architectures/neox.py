"""GPT-NeoX / Pythia: partial rotary, fused per-head qkv, parallel attention and MLP."""

from __future__ import annotations

from typing import Any

from ..config import HookedConfig
from ._common import StateDict, heads_out, rope_theta, unembed


def config_fields(hf: Any) -> dict[str, Any]:
    d_head = hf.hidden_size // hf.num_attention_heads
    params = getattr(hf, "rope_parameters", None) or {}
    fraction = params.get("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
    return dict(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_ctx=hf.max_position_embeddings,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        act_fn=hf.hidden_act,
        eps=hf.layer_norm_eps,
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=int(d_head * fraction),
        rotary_base=rope_theta(hf),
        parallel_attn_mlp=hf.use_parallel_residual,
        default_prepend_bos=False,  # TransformerLens 3.x: NeoX/Pythia prompts start without BOS
    )


def weights(model: Any, cfg: HookedConfig) -> StateDict:
    body = model.gpt_neox
    heads, d_model = cfg.n_heads, cfg.d_model
    sd: StateDict = {"embed.W_E": body.embed_in.weight.detach()}
    for layer, block in enumerate(body.layers):
        prefix = f"blocks.{layer}"
        ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
        sd[f"{prefix}.ln1.w"], sd[f"{prefix}.ln1.b"] = ln1.weight.detach(), ln1.bias.detach()
        # Rows are grouped per head: [heads, (q | k | v), d_head, d_model].
        qkv = block.attention.query_key_value
        w = qkv.weight.detach().view(heads, 3, -1, d_model)
        b = qkv.bias.detach().view(heads, 3, -1)
        for index, name in enumerate("QKV"):
            sd[f"{prefix}.attn.W_{name}"] = w[:, index].transpose(1, 2)
            sd[f"{prefix}.attn.b_{name}"] = b[:, index]
        sd[f"{prefix}.attn.W_O"] = heads_out(block.attention.dense.weight.detach(), heads)
        sd[f"{prefix}.attn.b_O"] = block.attention.dense.bias.detach()
        sd[f"{prefix}.ln2.w"], sd[f"{prefix}.ln2.b"] = ln2.weight.detach(), ln2.bias.detach()
        sd[f"{prefix}.mlp.W_in"] = block.mlp.dense_h_to_4h.weight.detach().T
        sd[f"{prefix}.mlp.b_in"] = block.mlp.dense_h_to_4h.bias.detach()
        sd[f"{prefix}.mlp.W_out"] = block.mlp.dense_4h_to_h.weight.detach().T
        sd[f"{prefix}.mlp.b_out"] = block.mlp.dense_4h_to_h.bias.detach()
    sd["ln_final.w"], sd["ln_final.b"] = (
        body.final_layer_norm.weight.detach(),
        body.final_layer_norm.bias.detach(),
    )
    unembed(model, sd, cfg.d_vocab_out)
    return sd
