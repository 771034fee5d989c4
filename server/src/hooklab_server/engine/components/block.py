"""One transformer block: attention then MLP (sequential), or both reading the block input
(parallel, GPT-NeoX), with the residual-stream hook points.

Norms: ln1/ln2 before attention and MLP; Gemma 2/3 also normalise their outputs (ln1_post,
ln2_post, weighted RMS, never folded) before ``hook_attn_out``/``hook_mlp_out``; OLMo 2
(``cfg.post_norm``) has no norm before them and applies ln1/ln2 to their outputs instead, as
TransformerLens names them."""

from __future__ import annotations

import torch
from torch import nn

from ..catalogue import module_hooks
from ..config import HookedConfig
from ..hook_points import HookRun
from .attention import Attention, AttentionMask, LayerKV, PooledKV
from .mlp import MLP
from .norm import Norm
from .rotary import Rotary


class TransformerBlock(nn.Module):
    def __init__(self, cfg: HookedConfig, layer: int, rotary: Rotary | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = Norm(
            cfg.normalization_type, cfg.d_model, cfg.eps, f"blocks.{layer}.ln1", cfg.dtype
        )
        self.attn = Attention(cfg, layer, rotary)
        self.ln2 = Norm(
            cfg.normalization_type, cfg.d_model, cfg.eps, f"blocks.{layer}.ln2", cfg.dtype
        )
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, layer, cfg.dtype)
        self.ln1_post: Norm | None = None
        self.ln2_post: Norm | None = None
        if cfg.use_normalization_before_and_after:
            self.ln1_post = Norm("RMS", cfg.d_model, cfg.eps, f"blocks.{layer}.ln1_post", cfg.dtype)
            self.ln2_post = Norm("RMS", cfg.d_model, cfg.eps, f"blocks.{layer}.ln2_post", cfg.dtype)
        self.names = module_hooks(f"blocks.{layer}")  # "resid_pre" -> "blocks.3.hook_resid_pre"

    def _attention_inputs(
        self, resid: torch.Tensor, hooks: HookRun
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normalised q/k/v inputs. TransformerLens applies ln1 once per input, so hook
        functions (and gradient captures) on ln1 run three times; without them one call serves
        all three.

        The per-head inputs (``hook_attn_in``, ``hook_q/k/v_input``) fire when their config
        flag is on or when they are asked for by exact name. Asked for, they switch this block
        to per-head arithmetic (ln1 and the projections per head copy, as TransformerLens with
        the flag on) only when a hook function changed a copy: capturing or reading them leaves
        the block's numbers as they are."""
        cfg, names = self.cfg, self.names
        heads, kv_heads = cfg.n_heads, cfg.n_key_value_heads
        assert kv_heads is not None  # HookedConfig sets it (n_heads when the checkpoint has none)
        ln1 = self._ln1_input
        if cfg.use_attn_in or hooks.asks_for(names["attn_in"]):
            name = names["attn_in"]
            per_head = hooks(name, resid.unsqueeze(2).expand(-1, -1, heads, -1).clone())
            if cfg.use_attn_in or _edited(per_head, resid, name, hooks):
                return ln1(per_head, hooks), ln1(per_head, hooks), ln1(per_head, hooks)
        split = ("q_input", heads), ("k_input", kv_heads), ("v_input", kv_heads)
        if cfg.use_split_qkv_input or any(hooks.asks_for(names[key]) for key, _ in split):
            inputs = [
                hooks(names[key], resid.unsqueeze(2).expand(-1, -1, count, -1).clone())
                for key, count in split
            ]  # each [batch, pos, heads, d_model]
            edits = zip(inputs, (names[key] for key, _ in split), strict=True)
            if cfg.use_split_qkv_input or any(_edited(x, resid, n, hooks) for x, n in edits):
                q_in, k_in, v_in = (ln1(x, hooks) for x in inputs)
                return q_in, k_in, v_in
        if cfg.post_norm:
            return resid, resid, resid
        if hooks.runs_per_call(self.ln1.scale_name) or hooks.runs_per_call(
            self.ln1.normalized_name
        ):
            return ln1(resid, hooks), ln1(resid, hooks), ln1(resid, hooks)
        x = ln1(resid, hooks)
        return x, x, x

    def _ln1_input(self, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        """ln1 on an attention input; a post-norm block (OLMo 2) reads its input as it is."""
        return x if self.cfg.post_norm else self.ln1(x, hooks)

    def _mlp(self, mlp_in: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        """The MLP's output as added to the residual stream, with its norms."""
        post_norm = self.cfg.post_norm
        out = self.mlp(mlp_in if post_norm else self.ln2(mlp_in, hooks), hooks)
        if self.ln2_post is not None:
            out = self.ln2_post(out, hooks)
        return self.ln2(out, hooks) if post_norm else out

    def forward(
        self,
        resid: torch.Tensor,
        hooks: HookRun,
        positions: torch.Tensor,
        mask: AttentionMask,
        past: LayerKV | PooledKV | None = None,
    ) -> tuple[torch.Tensor, LayerKV | None]:
        names = self.names
        resid = hooks(names["resid_pre"], resid)  # [batch, pos, d_model]
        q_in, k_in, v_in = self._attention_inputs(resid, hooks)
        attn_out, present = self.attn(q_in, k_in, v_in, hooks, positions, mask, past)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out, hooks)
        if self.cfg.post_norm:
            attn_out = self.ln1(attn_out, hooks)
        attn_out = hooks(names["attn_out"], attn_out)  # [batch, pos, d_model]
        if self.cfg.parallel_attn_mlp:
            mlp_in = resid
        else:
            mlp_in = resid = hooks(names["resid_mid"], resid + attn_out)  # [batch, pos, d_model]
        if self.cfg.use_hook_mlp_in or hooks.asks_for(names["mlp_in"]):
            mlp_in = hooks(names["mlp_in"], mlp_in.clone())  # [batch, pos, d_model]
        mlp_out = hooks(names["mlp_out"], self._mlp(mlp_in, hooks))
        # Parallel blocks: resid is still resid_pre, so both outputs are added here.
        resid_post = resid + attn_out + mlp_out if self.cfg.parallel_attn_mlp else resid + mlp_out
        return hooks(names["resid_post"], resid_post), present  # [batch, pos, d_model]


def _edited(per_head: torch.Tensor, resid: torch.Tensor, name: str, hooks: HookRun) -> bool:
    """Whether the block must compute from the per-head copies of ``resid``: a hook function
    changed one (a capture cannot), or a backward pass wants the gradient there (which only
    reaches them when they are used)."""
    if hooks.wants_gradient(name):
        return True
    return name in hooks.fns and not torch.equal(per_head, resid.unsqueeze(2).expand_as(per_head))
