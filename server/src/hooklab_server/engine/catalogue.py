"""The hook points, each declared once; every list of hook names is derived from HOOK_POINTS.

In the spirit of TransformerLens's ``HookedRootModule.setup`` (which builds ``hook_dict`` from the
HookPoint modules), one entry per hook point says: its name ("{layer}" for a point in every
block), the axes of its activation, the configs that have it, the config flag that makes a
conditional point fire on every forward, and its TransformerLens short name (``get_act_name``).
The components take their names from here too (:func:`module_hooks`), so an undeclared name
fails when the model is built rather than never firing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

from hooklab_proto import SAE_POINTS
from hooklab_proto import axis_sizes as wire_axis_sizes

from .config import HookedConfig

# Axis names: batch, pos (the query position in scores/patterns), key_pos, head, kv_head,
# d_head, d_model, d_mlp, d_vocab, and one (the size-1 axis of a norm's scale). Per-head qk-norm
# points are flattened as TransformerLens has them: head_row = batch * pos * head (kv_head_row
# likewise); OLMo 2's qk-norm acts on q_width = head * d_head (kv_width = kv_head * d_head).
Shape = tuple[str, ...]

RESID: Shape = ("batch", "pos", "d_model")
RESID_PER_HEAD: Shape = ("batch", "pos", "head", "d_model")
RESID_PER_KV_HEAD: Shape = ("batch", "pos", "kv_head", "d_model")
PER_HEAD: Shape = ("batch", "pos", "head", "d_head")
PER_KV_HEAD: Shape = ("batch", "pos", "kv_head", "d_head")
SCORES: Shape = ("batch", "head", "pos", "key_pos")
SCALE: Shape = ("batch", "pos", "one")
NEURONS: Shape = ("batch", "pos", "d_mlp")
LOGITS: Shape = ("batch", "pos", "d_vocab")
HEAD_ROWS: Shape = ("head_row", "d_head")
KV_HEAD_ROWS: Shape = ("kv_head_row", "d_head")
Q_WIDE: Shape = ("batch", "pos", "q_width")
KV_WIDE: Shape = ("batch", "pos", "kv_width")


def always(cfg: HookedConfig) -> bool:
    return True


def learned_positions(cfg: HookedConfig) -> bool:
    return cfg.positional_embedding_type == "standard"


def rotary(cfg: HookedConfig) -> bool:
    return cfg.positional_embedding_type == "rotary"


def sequential(cfg: HookedConfig) -> bool:
    return not cfg.parallel_attn_mlp  # parallel blocks have no residual between attn and MLP


def pre_norm(cfg: HookedConfig) -> bool:
    return not cfg.post_norm


def post_norm(cfg: HookedConfig) -> bool:
    return cfg.post_norm


def norms_after(cfg: HookedConfig) -> bool:
    return cfg.use_normalization_before_and_after


def qk_norm_per_head(cfg: HookedConfig) -> bool:
    return cfg.use_qk_norm


def qk_norm_all_heads(cfg: HookedConfig) -> bool:
    return cfg.post_norm  # OLMo 2


def gated(cfg: HookedConfig) -> bool:
    return cfg.gated_mlp


def ungrouped(cfg: HookedConfig) -> bool:
    return not cfg.grouped_query


def grouped(cfg: HookedConfig) -> bool:
    return cfg.grouped_query


@dataclass(frozen=True)
class HookPointSpec:
    name: str  # the full name; "{layer}" in it: one point per block
    shape: Shape
    exists: Callable[[HookedConfig], bool] = always
    flag: str | None = None  # config flag that makes a conditional point fire by default
    act: str | None = None  # TransformerLens short name: get_act_name(act, layer) == name

    @property
    def per_block(self) -> bool:
        return "{layer}" in self.name


H = HookPointSpec  # short, for the table below
SPLIT_QKV = "use_split_qkv_input"

# In firing order (TransformerLens's, with every conditional point on). A name declared twice
# has a different shape under grouped-query attention; the two conditions exclude each other.
HOOK_POINTS: tuple[HookPointSpec, ...] = (
    H("hook_embed", RESID),
    H("hook_pos_embed", RESID, learned_positions),
    H("blocks.{layer}.hook_resid_pre", RESID, act="resid_pre"),
    H("blocks.{layer}.hook_attn_in", RESID_PER_HEAD, flag="use_attn_in", act="attn_in"),
    H("blocks.{layer}.hook_q_input", RESID_PER_HEAD, flag=SPLIT_QKV, act="q_input"),
    H("blocks.{layer}.hook_k_input", RESID_PER_HEAD, ungrouped, flag=SPLIT_QKV, act="k_input"),
    H("blocks.{layer}.hook_k_input", RESID_PER_KV_HEAD, grouped, flag=SPLIT_QKV, act="k_input"),
    H("blocks.{layer}.hook_v_input", RESID_PER_HEAD, ungrouped, flag=SPLIT_QKV, act="v_input"),
    H("blocks.{layer}.hook_v_input", RESID_PER_KV_HEAD, grouped, flag=SPLIT_QKV, act="v_input"),
    H("blocks.{layer}.ln1.hook_scale", SCALE, pre_norm),
    H("blocks.{layer}.ln1.hook_normalized", RESID, pre_norm),
    H("blocks.{layer}.attn.hook_q", PER_HEAD, act="q"),
    H("blocks.{layer}.attn.hook_k", PER_KV_HEAD, act="k"),
    H("blocks.{layer}.attn.hook_v", PER_KV_HEAD, act="v"),
    H("blocks.{layer}.attn.q_norm.hook_scale", ("head_row", "one"), qk_norm_per_head),
    H("blocks.{layer}.attn.q_norm.hook_scale", SCALE, qk_norm_all_heads),
    H("blocks.{layer}.attn.q_norm.hook_normalized", HEAD_ROWS, qk_norm_per_head),
    H("blocks.{layer}.attn.q_norm.hook_normalized", Q_WIDE, qk_norm_all_heads),
    H("blocks.{layer}.attn.k_norm.hook_scale", ("kv_head_row", "one"), qk_norm_per_head),
    H("blocks.{layer}.attn.k_norm.hook_scale", SCALE, qk_norm_all_heads),
    H("blocks.{layer}.attn.k_norm.hook_normalized", KV_HEAD_ROWS, qk_norm_per_head),
    H("blocks.{layer}.attn.k_norm.hook_normalized", KV_WIDE, qk_norm_all_heads),
    H("blocks.{layer}.attn.hook_rot_q", PER_HEAD, rotary, act="rot_q"),
    H("blocks.{layer}.attn.hook_rot_k", PER_KV_HEAD, rotary, act="rot_k"),
    H("blocks.{layer}.attn.hook_attn_scores", SCORES, act="attn_scores"),
    H("blocks.{layer}.attn.hook_pattern", SCORES, act="pattern"),
    H("blocks.{layer}.attn.hook_z", PER_HEAD, act="z"),
    H("blocks.{layer}.attn.hook_result", RESID_PER_HEAD, flag="use_attn_result", act="result"),
    H("blocks.{layer}.ln1.hook_scale", SCALE, post_norm),  # OLMo 2: on the attention output
    H("blocks.{layer}.ln1.hook_normalized", RESID, post_norm),
    H("blocks.{layer}.ln1_post.hook_scale", SCALE, norms_after),
    H("blocks.{layer}.ln1_post.hook_normalized", RESID, norms_after),
    H("blocks.{layer}.hook_attn_out", RESID, act="attn_out"),
    H("blocks.{layer}.hook_resid_mid", RESID, sequential, act="resid_mid"),
    H("blocks.{layer}.hook_mlp_in", RESID, flag="use_hook_mlp_in", act="mlp_in"),
    H("blocks.{layer}.ln2.hook_scale", SCALE, pre_norm),
    H("blocks.{layer}.ln2.hook_normalized", RESID, pre_norm),
    H("blocks.{layer}.mlp.hook_pre", NEURONS, act="pre"),
    H("blocks.{layer}.mlp.hook_pre_linear", NEURONS, gated, act="pre_linear"),
    H("blocks.{layer}.mlp.hook_post", NEURONS, act="post"),
    H("blocks.{layer}.ln2.hook_scale", SCALE, post_norm),  # OLMo 2: on the MLP output
    H("blocks.{layer}.ln2.hook_normalized", RESID, post_norm),
    H("blocks.{layer}.ln2_post.hook_scale", SCALE, norms_after),
    H("blocks.{layer}.ln2_post.hook_normalized", RESID, norms_after),
    H("blocks.{layer}.hook_mlp_out", RESID, act="mlp_out"),
    H("blocks.{layer}.hook_resid_post", RESID, act="resid_post"),
    H("ln_final.hook_scale", SCALE),
    H("ln_final.hook_normalized", RESID),
    H("unembed.hook_in", RESID),
    H("unembed.hook_out", LOGITS),
)

_BLOCK = re.compile(r"^blocks\.\d+(?=\.|$)")


def _template(name: str) -> str:
    """The declared name: blocks.3.attn.hook_q -> blocks.{layer}.attn.hook_q."""
    return _BLOCK.sub("blocks.{layer}", name)


_DECLARED: dict[str, list[HookPointSpec]] = {}
for _point in HOOK_POINTS:
    _DECLARED.setdefault(_point.name, []).append(_point)


def _present(cfg: HookedConfig) -> list[HookPointSpec]:
    """The declarations this config has, in order."""
    return [point for point in HOOK_POINTS if point.exists(cfg)]


_SAE_POINT = re.compile(r"^(.+)\.(hook_sae_[a-z_]+)$")


def sae_axis(host: str) -> str:
    """The axis of an SAE's features: one name per attached SAE, sized by its d_sae."""
    return f"d_sae[{host}]"


# A per-head point's heads side by side, as SAELens flattens hook_z for an SAE (its
# reshape_activations="hook_z"): the axis each [head, d] pair becomes.
FLAT_HEADS: dict[Shape, str] = {
    ("head", "d_head"): "q_width",
    ("kv_head", "d_head"): "kv_width",
    ("head", "d_model"): "head_d_model",
    ("kv_head", "d_model"): "kv_head_d_model",
}


def sae_input_shape(host: Shape) -> Shape | None:
    """The axes an SAE reads at a point of axes ``host`` (``hook_sae_input``, ``hook_sae_recons``):
    [batch, pos, d] as they are, a per-head [batch, pos, head, d] flattened; None for others."""
    if host[:2] != ("batch", "pos"):
        return None
    if len(host) == 3:
        return host
    width = FLAT_HEADS.get(host[2:])
    return None if width is None else (*host[:2], width)


def sae_host(name: str, cfg: HookedConfig) -> tuple[str, str] | None:
    """(host, point) for a point of an SAE attached in this config, else None."""
    match = _SAE_POINT.match(name)
    if match is None or match.group(1) not in cfg.sae_widths:
        return None
    if match.group(2) not in SAE_POINTS:
        return None
    return match.group(1), match.group(2)


def _spec(name: str, cfg: HookedConfig) -> HookPointSpec:
    found = sae_host(name, cfg)
    if found is not None:
        host, sae_point = found
        shape = _spec(host, cfg).shape
        if sae_point in ("hook_sae_error", "hook_sae_output"):
            return HookPointSpec(name, shape)  # passed on in the host's own shape
        flat = sae_input_shape(shape)
        assert flat is not None, f"an SAE at {host!r} of axes {shape}"  # attach_sae checks
        if sae_point in ("hook_sae_acts_pre", "hook_sae_acts_post"):
            flat = (*flat[:-1], sae_axis(host))
        return HookPointSpec(name, flat)
    for point in _DECLARED.get(_template(name), ()):
        if point.exists(cfg):
            return point
    raise KeyError(f"no hook point {name!r} in this model")


def hook_names(cfg: HookedConfig) -> list[str]:
    """Every hook point (TransformerLens's ``hook_dict`` for the architecture), in firing order."""
    names: list[str] = []
    for per_block, points in groupby(_present(cfg), key=lambda point: point.per_block):
        group = [point.name for point in points]
        if per_block:
            names += [name.format(layer=layer) for layer in range(cfg.n_layers) for name in group]
        else:
            names += group
    if cfg.sae_widths:
        names = [
            attached
            for name in names
            for attached in (
                [name, *(f"{name}.{point}" for point in SAE_POINTS)]
                if name in cfg.sae_widths
                else [name]
            )
        ]
    return names


def hook_shape(name: str, cfg: HookedConfig) -> Shape:
    """Axis names of a hook point's activation, e.g. ``("batch", "pos", "head", "d_head")``.

    Attention scores and patterns are ``("batch", "head", "pos", "key_pos")``: their ``pos`` axis
    is the query position. KeyError for a name this model lacks.
    """
    return _spec(name, cfg).shape


def fires_by_default(name: str, cfg: HookedConfig) -> bool:
    """Whether a hook point fires without being asked for (TransformerLens's default flags)."""
    flag = _spec(name, cfg).flag
    return flag is None or bool(getattr(cfg, flag))


def act_names(cfg: HookedConfig) -> dict[str, str]:
    """TransformerLens short names of the per-block points this config has, with their name
    templates: ``{"resid_pre": "blocks.{layer}.hook_resid_pre", "z": ...}``."""
    return {point.act: point.name for point in _present(cfg) if point.act is not None}


def module_hooks(module: str) -> dict[str, str]:
    """The hook points declared directly in ``module`` ("blocks.3.attn", "blocks.3", "ln_final",
    "" for the model), by their name there without "hook_": ``{"q": "blocks.3.attn.hook_q"}``.

    Declared for every config: the component decides which of them its config fires.
    """
    template = _template(module)
    found = {}
    for point in HOOK_POINTS:
        parent, _, hook = point.name.rpartition(".")
        if parent == template:
            found[hook.removeprefix("hook_")] = f"{module}.{hook}" if module else hook
    if not found:
        raise KeyError(f"no hook points declared in {module!r}")
    return found


def axis_sizes(
    cfg: HookedConfig, batch: int, pos: int, key_pos: int | None = None
) -> dict[str, int]:
    sizes = wire_axis_sizes(
        batch, pos, key_pos, n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads,
        d_head=cfg.d_head, d_model=cfg.d_model, d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab_out,
    )  # fmt: skip
    for host, width in cfg.sae_widths.items():
        sizes[sae_axis(host)] = width
    return sizes
