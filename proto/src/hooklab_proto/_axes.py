"""The sizes of the named axes in hook shapes (``/v1/model`` lists each hook point's shape as
axis names): one rule for the server, which checks and sizes activations, and the clients,
which build hook functions for them."""

from __future__ import annotations

# The points an attached sparse autoencoder adds after its hook ("{hook}.hook_sae_input" …), in
# firing order, as SAELens's HookedSAETransformer names them; the feature axis is "d_sae[{hook}]".
SAE_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)


def axis_sizes(
    batch: int,
    pos: int,
    key_pos: int | None = None,
    *,
    n_heads: int,
    n_kv_heads: int | None,
    d_head: int,
    d_model: int,
    d_mlp: int | None,
    d_vocab: int,
) -> dict[str, int]:
    """Each axis name's size for a batch of ``batch`` rows of ``pos`` positions attending over
    ``key_pos`` keys (``pos`` when None). ``*_row`` axes flatten batch, position and head (the
    per-head query/key norms of Qwen3, Gemma 3); ``*_width`` axes are heads * d_head and
    ``*head_d_model`` heads * d_model (a per-head point flattened for a sparse autoencoder)."""
    kv_heads = n_kv_heads or n_heads
    return {
        "batch": batch,
        "pos": pos,
        "key_pos": pos if key_pos is None else key_pos,
        "head": n_heads,
        "kv_head": kv_heads,
        "d_head": d_head,
        "d_model": d_model,
        "d_mlp": d_mlp or 0,
        "d_vocab": d_vocab,
        "one": 1,
        "head_row": batch * pos * n_heads,
        "kv_head_row": batch * pos * kv_heads,
        "q_width": n_heads * d_head,
        "kv_width": kv_heads * d_head,
        "head_d_model": n_heads * d_model,
        "kv_head_d_model": kv_heads * d_model,
    }
