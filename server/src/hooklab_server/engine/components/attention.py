"""Multi-head / grouped-query causal self-attention with TransformerLens's hook points.

Weights are stored as ``F.linear`` wants them ([out, in]); ``W_Q`` [n_heads, d_model, d_head] and
friends are views in TransformerLens's layout. Attention runs through
``scaled_dot_product_attention`` unless this call hooks or captures ``hook_attn_scores`` or
``hook_pattern`` in this layer; only then are the scores and pattern materialised.

Past keys and values come either from a :class:`LayerKV` (one generation, concatenated each step)
or from a :class:`PooledKV` (a row of a preallocated pool per generation row, written in place;
see ``engine/decode_pool.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..catalogue import module_hooks
from ..config import HookedConfig
from ..hook_points import HookRun
from .rotary import Rotary


@dataclass
class AttentionMask:
    """Which keys each query may attend to, shared by every layer of one forward.

    ``allowed`` is a bool mask [batch | 1, 1, query, key]; ``None`` means plain causal attention
    with as many queries as keys. ``empty_rows`` marks queries with no key at all
    [batch, query, 1, 1] (left-padding positions): their output is zero, as in TransformerLens.
    """

    allowed: torch.Tensor | None
    empty_rows: torch.Tensor | None = None


@dataclass
class LayerKV:
    """One layer's cached keys (after rotary) and values, [batch, pos, kv_heads, d_head]."""

    keys: torch.Tensor
    values: torch.Tensor


class RowSpan(NamedTuple):
    """One generation's rows in a pooled decode step: its rows, how many key columns it has
    (its own length, the new token included) and its hook run."""

    rows: slice
    keys: int
    hooks: HookRun


@dataclass
class PooledKV:
    """One layer of a decode pool during one step: one new token per row.

    ``keys``/``values`` are the whole pool [max_rows, max_pos, kv_heads, d_head] (after rotary);
    active rows are ``0:n``. Row ``r`` writes its new key at ``columns[r]``; the step reads
    ``width`` columns, with ``mask`` hiding each row's unused and padding columns. ``spans``
    lists the generations, so hooks on keys, scores and patterns see each one's own box.
    """

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor  # arange(n)
    columns: torch.Tensor  # [n]
    width: int
    spans: list[RowSpan]


class Attention(nn.Module):
    def __init__(self, cfg: HookedConfig, layer: int, rotary: Rotary | None) -> None:
        super().__init__()
        heads, kv_heads, d_head, d_model = (
            cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        )  # fmt: skip
        assert kv_heads is not None
        self.n_heads, self.n_kv_heads, self.d_head = heads, kv_heads, d_head
        self.scale = 1.0 / cfg.attn_scale
        dtype = cfg.dtype
        self.w_q = nn.Parameter(torch.empty(heads * d_head, d_model, dtype=dtype))
        self.w_k = nn.Parameter(torch.empty(kv_heads * d_head, d_model, dtype=dtype))
        self.w_v = nn.Parameter(torch.empty(kv_heads * d_head, d_model, dtype=dtype))
        self.w_o = nn.Parameter(torch.empty(d_model, heads * d_head, dtype=dtype))
        # Biases are None where the checkpoint has none (adding zeros is wasted work).
        self.b_q: nn.Parameter | None = None
        self.b_k: nn.Parameter | None = None
        self.b_v: nn.Parameter | None = None
        self.b_o: nn.Parameter | None = None
        self.rotary = rotary
        self.cfg = cfg
        self.names = module_hooks(f"blocks.{layer}.attn")  # "q" -> "blocks.3.attn.hook_q"

    # --- TransformerLens-layout views -----------------------------------------------------

    def _heads_in(self, weight: torch.Tensor, heads: int) -> torch.Tensor:
        return weight.view(heads, self.d_head, -1).transpose(1, 2)  # [heads, d_model, d_head]

    @property
    def W_Q(self) -> torch.Tensor:
        return self._heads_in(self.w_q, self.n_heads)

    @property
    def W_K(self) -> torch.Tensor:
        return self._heads_in(self.w_k, self.n_kv_heads)

    @property
    def W_V(self) -> torch.Tensor:
        return self._heads_in(self.w_v, self.n_kv_heads)

    @property
    def W_O(self) -> torch.Tensor:
        return self.w_o.T.view(self.n_heads, self.d_head, -1)  # [heads, d_head, d_model]

    # --- forward --------------------------------------------------------------------------

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int
    ) -> torch.Tensor:
        """[batch, pos, d_model] (or one copy per head) -> [batch, pos, heads, d_head]."""
        if x.dim() == 4:  # split-qkv inputs: one input copy per head
            out = torch.einsum("bphd,hde->bphe", x, self._heads_in(weight, heads))
            return out if bias is None else out + bias.view(heads, self.d_head)
        return F.linear(x, weight, bias).unflatten(-1, (heads, self.d_head))

    def forward(
        self,
        q_in: torch.Tensor,
        k_in: torch.Tensor,
        v_in: torch.Tensor,
        hooks: HookRun,
        positions: torch.Tensor,
        mask: AttentionMask,
        past: LayerKV | PooledKV | None = None,
    ) -> tuple[torch.Tensor, LayerKV | None]:
        """Returns the output and this call's keys and values (None when written to a pool)."""
        names = self.names
        q = hooks(names["q"], self._project(q_in, self.w_q, self.b_q, self.n_heads))
        k = hooks(names["k"], self._project(k_in, self.w_k, self.b_k, self.n_kv_heads))
        v = hooks(names["v"], self._project(v_in, self.w_v, self.b_v, self.n_kv_heads))
        # q: [batch, pos, n_heads, d_head]; k, v: [batch, pos, n_kv_heads, d_head]
        if self.rotary is not None:
            q = self.rotary(q, positions)
            k = self.rotary(k, positions)
        if isinstance(past, PooledKV):
            z, present = self._pooled(q, k, v, hooks, mask, past), None
        else:
            z, present = self._cached(q, k, v, hooks, mask, past)
        z = hooks(names["z"], z)  # [batch, pos, n_heads, d_head]
        return self._output(z, hooks), present

    def _cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hooks: HookRun,
        mask: AttentionMask,
        past: LayerKV | None,
    ) -> tuple[torch.Tensor, LayerKV]:
        """Attention over the past keys (concatenated in front) and this call's."""
        names = self.names
        if past is not None:
            k = torch.cat((past.keys, k), dim=1)
            v = torch.cat((past.values, v), dim=1)
        present = LayerKV(k, v)
        if self.rotary is not None:
            q = hooks(names["rot_q"], q)  # [batch, pos, n_heads, d_head]
            # TransformerLens caches keys before rotary: a hook's in-place edit stays out of it.
            k = hooks(names["rot_k"], k.clone() if names["rot_k"] in hooks.fns else k)
            # k: [batch, key_pos, n_kv_heads, d_head]
        if hooks.wants(names["attn_scores"]) or hooks.wants(names["pattern"]):
            z = self._explicit(q, k, v, hooks, mask)
        else:
            z = self._sdpa(q, k, v, mask)
        return z, present

    def _pooled(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hooks: HookRun,
        mask: AttentionMask,
        pool: PooledKV,
    ) -> torch.Tensor:
        """Attention of one new token per row against the pool, after writing that token's key
        and value. A generation whose hooks read or change the rotated keys, scores or pattern
        gets its own attention on its own rows and key columns, exactly its solo shapes; the
        rest share one SDPA call over every row."""
        names = self.names
        pool.keys[pool.rows, pool.columns] = k[:, 0]
        pool.values[pool.rows, pool.columns] = v[:, 0]
        n = q.shape[0]
        keys, values = pool.keys[:n, : pool.width], pool.values[:n, : pool.width]
        if self.rotary is not None:
            q = hooks(names["rot_q"], q)  # [batch, 1, n_heads, d_head]
        z = self._sdpa(q, keys, values, mask)
        for span in pool.spans:
            run = span.hooks
            hooks_keys = self.rotary is not None and run.wants(names["rot_k"])
            explicit = run.wants(names["attn_scores"]) or run.wants(names["pattern"])
            if not (hooks_keys or explicit):
                continue
            rows, width = span.rows, span.keys
            k_own, v_own = keys[rows, :width], values[rows, :width]
            if hooks_keys:  # a copy: a hook's change applies to this step only, as in solo
                k_own = run(names["rot_k"], k_own.clone())  # [batch, key_pos, kv_heads, d_head]
            assert mask.allowed is not None  # a pooled step always has an explicit mask
            own_mask = AttentionMask(mask.allowed[rows, :, :, :width])
            if explicit:
                z[rows] = self._explicit(q[rows], k_own, v_own, run, own_mask)
            else:
                z[rows] = self._sdpa(q[rows], k_own, v_own, own_mask)
        return z  # [batch, 1, n_heads, d_head]

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        grouped = self.n_kv_heads != self.n_heads
        if grouped and q.is_cuda and q.dtype == torch.float32:
            # CUDA's fused fp32 kernel needs equal head counts; expanding beats the math fallback.
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
            grouped = False
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask.allowed,
            is_causal=mask.allowed is None and q.shape[1] > 1,
            scale=self.scale,
            enable_gqa=grouped,
        ).transpose(1, 2)
        if mask.empty_rows is not None:
            z = z.masked_fill(mask.empty_rows, 0.0)  # SDPA gives NaN where no key is allowed
        return z

    def _explicit(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hooks: HookRun,
        mask: AttentionMask,
    ) -> torch.Tensor:
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        allowed = mask.allowed
        if allowed is None:
            query, key = scores.shape[-2:]
            allowed = torch.ones(query, key, dtype=torch.bool, device=q.device).tril(key - query)
        scores = scores.masked_fill(~allowed, float("-inf"))
        scores = hooks(self.names["attn_scores"], scores)  # [batch, n_heads, query, key]
        pattern = torch.softmax(scores, dim=-1)
        pattern = torch.where(pattern.isnan(), 0.0, pattern)
        pattern = hooks(self.names["pattern"], pattern)  # [batch, n_heads, query, key]
        return torch.einsum("bhqk,bkhd->bqhd", pattern.to(v.dtype), v)

    def _output(self, z: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        name = self.names["result"]
        if self.cfg.use_attn_result or hooks.asks_for(name):
            result = torch.einsum("bphe,hed->bphd", z, self.W_O)
            result = hooks(name, result)  # [batch, pos, n_heads, d_model]
            out = result.sum(dim=2)
            return out if self.b_o is None else out + self.b_o
        return F.linear(z.flatten(-2), self.w_o, self.b_o)  # [batch, pos, d_model]
