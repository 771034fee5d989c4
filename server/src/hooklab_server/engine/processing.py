"""TransformerLens's weight processing on a state dict in its layout, with its formulas.

Keys and shapes are TransformerLens's: ``blocks.{L}.attn.W_Q`` [n_heads, d_model, d_head],
``W_K``/``W_V`` [n_key_value_heads, d_model, d_head], ``W_O`` [n_heads, d_head, d_model],
``blocks.{L}.mlp.W_in``/``W_gate`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model],
``unembed.W_U`` [d_model, d_vocab], norms ``*.w``/``*.b``. Every bias is present (zeros where
the checkpoint has none). Processing runs in float32 and casts back, as TransformerLens does.
"""

from __future__ import annotations

import torch

from .config import HookedConfig

StateDict = dict[str, torch.Tensor]


def _fold_norm_into(
    sd: StateDict, norm: str, readers: list[tuple[str, str | None]], centre: bool, layer_axis: int
) -> None:
    """Fold norm ``norm``'s weight (and bias) into the weights that read its output.

    ``readers`` are (weight key, bias key) pairs; ``layer_axis`` is the d_model axis of the
    weights (1 for [heads, d_model, d_head], 0 for [d_model, out]).
    """
    weight = sd.pop(f"{norm}.w")
    bias = sd.pop(f"{norm}.b", None)
    for w_key, b_key in readers:
        w = sd[w_key]
        view = [1] * w.dim()
        view[layer_axis] = -1
        if bias is not None and b_key is not None:
            sd[b_key] = sd[b_key] + (w * bias.view(view)).sum(layer_axis)
        w = w * weight.view(view)
        if centre:
            w = w - w.mean(layer_axis, keepdim=True)
        sd[w_key] = w


def fold_layer_norm(sd: StateDict, cfg: HookedConfig) -> None:
    layer_norm = cfg.normalization_type == "LN"
    for layer in range(cfg.n_layers):
        attn, mlp = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        _fold_norm_into(
            sd,
            f"blocks.{layer}.ln1",
            [(f"{attn}.W_{x}", f"{attn}.b_{x}") for x in "QKV"],
            centre=layer_norm,
            layer_axis=1,
        )
        readers: list[tuple[str, str | None]] = [(f"{mlp}.W_in", f"{mlp}.b_in")]
        if cfg.gated_mlp:
            readers.append((f"{mlp}.W_gate", None))
        _fold_norm_into(sd, f"blocks.{layer}.ln2", readers, centre=layer_norm, layer_axis=0)
    _fold_norm_into(
        sd, "ln_final", [("unembed.W_U", "unembed.b_U")], centre=layer_norm, layer_axis=0
    )
    cfg.normalization_type = "LNPre" if layer_norm else "RMSPre"


def center_writing_weights(sd: StateDict, cfg: HookedConfig) -> None:
    """Remove the all-ones direction from everything written to the residual stream."""
    keys = ["embed.W_E"] + (["pos_embed.W_pos"] if "pos_embed.W_pos" in sd else [])
    for layer in range(cfg.n_layers):
        keys += [f"blocks.{layer}.attn.W_O", f"blocks.{layer}.attn.b_O"]
        keys += [f"blocks.{layer}.mlp.W_out", f"blocks.{layer}.mlp.b_out"]
    for key in keys:
        sd[key] = sd[key] - sd[key].mean(-1, keepdim=True)


def center_unembed(sd: StateDict) -> None:
    """Shift logits by a per-position constant so their mean over the vocabulary is zero."""
    sd["unembed.W_U"] = sd["unembed.W_U"] - sd["unembed.W_U"].mean(-1, keepdim=True)
    sd["unembed.b_U"] = sd["unembed.b_U"] - sd["unembed.b_U"].mean()


def fold_value_biases(sd: StateDict, cfg: HookedConfig) -> None:
    """Move b_V into b_O: exact because every attention pattern row sums to one."""
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    for layer in range(cfg.n_layers):
        attn = f"blocks.{layer}.attn"
        b_v = sd[f"{attn}.b_V"].repeat_interleave(group, dim=0)  # [n_heads, d_head]
        sd[f"{attn}.b_O"] = sd[f"{attn}.b_O"] + torch.einsum("hd,hdm->m", b_v, sd[f"{attn}.W_O"])
        sd[f"{attn}.b_V"] = torch.zeros_like(sd[f"{attn}.b_V"])


def process_weights(
    sd: StateDict,
    cfg: HookedConfig,
    fold_ln: bool = True,
    center_writing_weights_: bool = True,
    center_unembed_: bool = True,
    fold_value_biases_: bool = True,
) -> StateDict:
    """Apply TransformerLens's default processing in its order; updates ``cfg`` (norm type and
    ``processing``) to describe the result.

    As TransformerLens's ``from_pretrained``: a post-norm model (OLMo 2) is neither folded nor
    centred (its norms act on sublayer outputs), and logits that are soft-capped (Gemma 2) are
    not centred. Norms after a sublayer (Gemma's ln1_post/ln2_post) and q/k norms keep their
    weights."""
    if cfg.post_norm:
        fold_ln = center_writing_weights_ = False
    if cfg.output_logits_soft_cap > 0:
        center_unembed_ = False
    dtypes = {key: value.dtype for key, value in sd.items()}
    sd = {key: value.float() for key, value in sd.items()}
    layer_norm = cfg.normalization_type in ("LN", "LNPre")
    if fold_ln and cfg.normalization_type in ("LN", "RMS"):
        fold_layer_norm(sd, cfg)
    centre = center_writing_weights_ and layer_norm and not cfg.final_rms
    if centre:
        center_writing_weights(sd, cfg)
    if center_unembed_:
        center_unembed(sd)
    if fold_value_biases_:
        fold_value_biases(sd, cfg)
        if centre:
            for layer in range(cfg.n_layers):
                b_o = sd[f"blocks.{layer}.attn.b_O"]
                sd[f"blocks.{layer}.attn.b_O"] = b_o - b_o.mean()
    cfg.processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": centre,
        "center_unembed": center_unembed_,
        "fold_value_biases": fold_value_biases_,
    }
    return {key: value.to(dtypes[key]) for key, value in sd.items()}
