"""Symbolic shapes of the hook points, for validating specs and describing the model."""

from __future__ import annotations

from .config import HookedConfig

Shape = tuple[str, ...]

_CONDITIONAL = (
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_mlp_in",
    "attn.hook_result",
)


def hook_shape(name: str, cfg: HookedConfig) -> Shape:
    """Axis names of a hook point's activation, e.g. ``("batch", "pos", "head", "d_head")``.

    Attention scores and patterns are ``("batch", "head", "pos", "key_pos")``: their ``pos`` axis
    is the query position.
    """
    last = name.rsplit(".", 1)[-1]
    kv = cfg.n_key_value_heads != cfg.n_heads
    heads = {"hook_k": "kv_head", "hook_v": "kv_head", "hook_rot_k": "kv_head"}.get(last, "head")
    if last in ("hook_k_input", "hook_v_input") and kv:
        heads = "kv_head"
    if last in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k"):
        return ("batch", "pos", heads, "d_head")
    if last in ("hook_attn_scores", "hook_pattern"):
        return ("batch", "head", "pos", "key_pos")
    if last in ("hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"):
        return ("batch", "pos", heads, "d_model")
    if last == "hook_scale":
        return ("batch", "pos", "one")
    if name.startswith("blocks.") and ".mlp." in name:
        return ("batch", "pos", "d_mlp")
    if name == "unembed.hook_out":
        return ("batch", "pos", "d_vocab")
    return ("batch", "pos", "d_model")


def axis_sizes(
    cfg: HookedConfig, batch: int, pos: int, key_pos: int | None = None
) -> dict[str, int]:
    return {
        "batch": batch,
        "pos": pos,
        "key_pos": pos if key_pos is None else key_pos,
        "head": cfg.n_heads,
        "kv_head": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab_out,
        "one": 1,
    }


def fires_by_default(name: str, cfg: HookedConfig) -> bool:
    """Whether a hook point fires without being asked for (TransformerLens's default flags)."""
    flags = {
        "attn.hook_result": cfg.use_attn_result,
        "hook_attn_in": cfg.use_attn_in,
        "hook_q_input": cfg.use_split_qkv_input,
        "hook_k_input": cfg.use_split_qkv_input,
        "hook_v_input": cfg.use_split_qkv_input,
        "hook_mlp_in": cfg.use_hook_mlp_in,
    }
    for suffix in _CONDITIONAL:
        if name.endswith(suffix):
            return flags[suffix]
    return True
