"""Multi-head / grouped-query causal self-attention with TransformerLens's hook points.

Weights are stored as ``F.linear`` wants them ([out, in]); ``W_Q`` [n_heads, d_model, d_head] and
friends are views in TransformerLens's layout.

Attention always runs TransformerLens's arithmetic: scores ``q @ k^T / attn_scale`` (soft-capped
as ``c * tanh(s / c)`` when ``attn_scores_soft_cap`` is set, Gemma 2), masked to ``-inf``,
softmax, NaN rows to zero, ``pattern @ v``. There is no fused path that a hook or a capture would
switch off, so what a call captures or reads never changes its numbers: a plain forward, a
``run_with_cache`` of any names and a run with read-only hook functions give the same bits.
Grouped-query heads share their key/value head through a reshape of the queries, not a copy of
the keys and values.

Qwen3 and Gemma 3 normalise each query and key head after ``hook_q``/``hook_k`` (``q_norm`` and
``k_norm`` over d_head; their hooks see TransformerLens's flattened [batch * pos * heads, ...]);
OLMo 2 normalises all heads at once ([batch, pos, heads * d_head]).

Past keys and values come either from a :class:`LayerKV` (one generation, written each step into
room it reserved)
or from a :class:`PooledKV` (a row of a preallocated pool per generation row, written in place;
see ``engine/decode_pool.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..catalogue import module_hooks
from ..config import HookedConfig
from ..hook_points import HookRun
from .fused import RowConcat, fused_bias
from .linear import linear
from .norm import Norm
from .rotary import Rotary


@dataclass
class AttentionMask:
    """Which keys each query may attend to, shared by every layer of one forward.

    ``allowed`` is a bool mask [batch | 1, 1, query, key]; ``None`` means plain causal attention
    with as many queries as keys (or one query that sees every key). A query with no key at all
    (a left-padding position) gets a NaN softmax row, zeroed as in TransformerLens.
    """

    allowed: torch.Tensor | None
    _blocked: torch.Tensor | None = field(default=None, init=False, repr=False)

    def blocked(self, query: int, key: int, device: torch.device) -> torch.Tensor | None:
        """True where a query may not see a key, [batch | 1, 1, query, key]; None: nothing is
        blocked. Made once per forward, on its first layer."""
        if self._blocked is None:
            if self.allowed is not None:
                self._blocked = ~self.allowed
            elif query > 1:
                causal = torch.ones(query, key, dtype=torch.bool, device=device)
                self._blocked = causal.triu(key - query + 1)[None, None]
        return self._blocked


def head_major(shape: tuple[int, ...], like: torch.Tensor, zeros: bool = False) -> torch.Tensor:
    """Room for keys or values shaped [..., pos, kv_heads, d_head] as the hooks see them, laid
    out head by head ([..., kv_heads, pos, d_head] in memory): each head's keys and values are
    then one strided matrix, which attention's matmuls read in place, where a position-major
    cache would be copied whole for every layer and decode step."""
    *lead, pos, heads, d_head = shape
    make = torch.zeros if zeros else torch.empty
    room = make((*lead, heads, pos, d_head), dtype=like.dtype, device=like.device)
    return room.transpose(-3, -2)


@dataclass
class _KVStore:
    """Preallocated room for one layer's keys and values, [batch, capacity, kv_heads, d_head];
    ``filled`` positions are written (by the one :class:`LayerKV` that may extend it)."""

    keys: torch.Tensor
    values: torch.Tensor
    filled: int


@dataclass
class LayerKV:
    """One layer's cached keys (after rotary) and values, [batch, pos, kv_heads, d_head].

    Extending it writes the new positions into preallocated room (``reserve`` positions, the
    length a generation will reach; past that the room doubles) instead of concatenating: the
    keys and values are views of that room. Only the latest of a line of caches writes in
    place; extending an older one (a branch) copies what it has to new room first."""

    keys: torch.Tensor
    values: torch.Tensor
    reserve: int = 0
    _store: _KVStore | None = field(default=None, repr=False)

    def extended(self, keys: torch.Tensor, values: torch.Tensor) -> LayerKV:
        """This cache with ``keys``/``values`` [batch, new, kv_heads, d_head] after it."""
        length, new = self.keys.shape[1], keys.shape[1]
        total = length + new
        store = self._store
        if (
            store is None
            or store.filled != length
            or store.keys.shape[1] < total
            or store.keys.shape[0] != keys.shape[0]
            or store.keys.dtype != keys.dtype
        ):
            capacity = self.reserve if self.reserve >= total else max(total, 2 * length)
            room = (keys.shape[0], capacity, *keys.shape[2:])
            keys_room, values_room = head_major(room, keys), head_major(room, values)
            store = _KVStore(keys_room, values_room, length)
            store.keys[:, :length] = self.keys
            store.values[:, :length] = self.values
        store.keys[:, length:total] = keys
        store.values[:, length:total] = values
        store.filled = total
        return LayerKV(store.keys[:, :total], store.values[:, :total], self.reserve, store)


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
    # q/k/v through one matmul (components/fused.py); False runs three (tests compare them).
    fuse: ClassVar[bool] = True

    def __init__(self, cfg: HookedConfig, layer: int, rotary: Rotary | None) -> None:
        super().__init__()
        heads, kv_heads, d_head, d_model = (
            cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        )  # fmt: skip
        assert kv_heads is not None
        self.n_heads, self.n_kv_heads, self.d_head = heads, kv_heads, d_head
        self.attn_scale = cfg.attn_scale
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
        self._qkv_weight, self._qkv_bias = RowConcat(), RowConcat()
        self.rotary = rotary
        self.soft_cap = cfg.attn_scores_soft_cap
        self.cfg = cfg
        self.names = module_hooks(f"blocks.{layer}.attn")  # "q" -> "blocks.3.attn.hook_q"
        # Query/key norms (always RMS with weights; never folded): over each head's d_head
        # (Qwen3, Gemma 3), or over all heads at once (OLMo 2).
        self.q_norm: Norm | None = None
        self.k_norm: Norm | None = None
        if cfg.use_qk_norm or cfg.post_norm:
            q_len, k_len = (d_head, d_head) if cfg.use_qk_norm else (
                heads * d_head, kv_heads * d_head
            )  # fmt: skip
            prefix = f"blocks.{layer}.attn"
            self.q_norm = Norm("RMS", q_len, cfg.eps, f"{prefix}.q_norm", dtype)
            self.k_norm = Norm("RMS", k_len, cfg.eps, f"{prefix}.k_norm", dtype)

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
        return linear(x, weight, bias).unflatten(-1, (heads, self.d_head))

    def _project_fused(
        self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, hooks: HookRun
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [batch, pos, heads, d_head] from [batch, pos, d_model] inputs through the
        fused q/k/v weight: views of one product when the three inputs are one tensor (or equal
        and no gradient must tell them apart), else the matching columns of one product per
        input, so the bits never depend on which path ran."""
        heads, kv_heads, d_head = self.n_heads, self.n_kv_heads, self.d_head
        sizes = (heads * d_head, kv_heads * d_head, kv_heads * d_head)
        weight = self._qkv_weight((self.w_q, self.w_k, self.w_v))
        bias = fused_bias(self._qkv_bias, (self.b_q, self.b_k, self.b_v), sizes)
        inputs = [q_in, k_in, v_in]
        if not hooks.gradients:
            for i in (1, 2):
                if inputs[i] is not q_in and torch.equal(inputs[i], q_in):
                    inputs[i] = q_in
        products: dict[int, tuple[torch.Tensor, ...]] = {}
        out = []
        for i, x in enumerate(inputs):
            if id(x) not in products:
                products[id(x)] = linear(x, weight, bias).split(sizes, dim=-1)
            out.append(products[id(x)][i].unflatten(-1, (-1, d_head)))
        return out[0], out[1], out[2]

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
        if q_in.dim() == 3 and self.fuse:  # one matmul per input; hooks see views of it
            q_raw, k_raw, v_raw = self._project_fused(q_in, k_in, v_in, hooks)
        else:
            q_raw = self._project(q_in, self.w_q, self.b_q, self.n_heads)
            k_raw = self._project(k_in, self.w_k, self.b_k, self.n_kv_heads)
            v_raw = self._project(v_in, self.w_v, self.b_v, self.n_kv_heads)
        q = hooks(names["q"], q_raw)
        k = hooks(names["k"], k_raw)
        v = hooks(names["v"], v_raw)
        # q: [batch, pos, n_heads, d_head]; k, v: [batch, pos, n_kv_heads, d_head]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self._qk_norm(q, self.q_norm, hooks), self._qk_norm(k, self.k_norm, hooks)
        if self.rotary is not None:
            q = self.rotary(q, positions)
            k = self.rotary(k, positions)
        if isinstance(past, PooledKV):
            z, present = self._pooled(q, k, v, hooks, mask, past), None
        else:
            z, present = self._cached(q, k, v, hooks, mask, past)
        z = hooks(names["z"], z)  # [batch, pos, n_heads, d_head]
        return self._output(z, hooks), present

    def _qk_norm(self, x: torch.Tensor, norm: Norm, hooks: HookRun) -> torch.Tensor:
        """``x`` [batch, pos, heads, d_head] normalised per head (hooks see TransformerLens's
        flattened [batch * pos * heads, ...]) or across heads (hooks see [batch, pos, width])."""
        if self.cfg.use_qk_norm:
            return norm(x.reshape(-1, x.shape[-1]), hooks.flat_rows(x.shape[0])).view_as(x)
        return norm(x.flatten(-2), hooks).view_as(x)

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
            present = past.extended(k, v)
            k, v = present.keys, present.values
        else:
            present = LayerKV(k, v)
        if self.rotary is not None:
            q = hooks(names["rot_q"], q)  # [batch, pos, n_heads, d_head]
            # TransformerLens caches keys before rotary: a hook's in-place edit stays out of it.
            k = hooks(names["rot_k"], k.clone() if names["rot_k"] in hooks.fns else k)
            # k: [batch, key_pos, n_kv_heads, d_head]
        return self._attend(q, k, v, hooks, mask), present

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
        and value: one computation over every row and ``width`` key columns. Each generation's
        hooks on the rotated keys, scores and pattern see its own box (its rows, its own key
        columns), the shapes of its solo step; what they read or capture changes nothing."""
        names = self.names
        pool.keys[pool.rows, pool.columns] = k[:, 0]
        pool.values[pool.rows, pool.columns] = v[:, 0]
        n = q.shape[0]
        keys, values = pool.keys[:n, : pool.width], pool.values[:n, : pool.width]
        if self.rotary is not None:
            q = hooks(names["rot_q"], q)  # [batch, 1, n_heads, d_head]
            keys = self._pooled_keys(keys, pool)
        return self._attend(q, keys, values, _span_boxes(pool.spans), mask)  # [batch, 1, ...]

    def _pooled_keys(self, keys: torch.Tensor, pool: PooledKV) -> torch.Tensor:
        """The keys with each generation's ``hook_rot_k`` run on its own box. A hook gets a copy
        (its change applies to this step only, as in solo); the pool's keys are copied once,
        and only when some hook did change its box."""
        name, copied = self.names["rot_k"], False
        for span in pool.spans:
            if not span.hooks.wants(name):
                continue
            box = keys[span.rows, : span.keys]  # [batch, key_pos, kv_heads, d_head]
            hooked = span.hooks(name, box.clone() if name in span.hooks.fns else box)
            if hooked is not box and not torch.equal(hooked, box):
                if not copied:
                    keys, copied = keys.clone(), True
                keys[span.rows, : span.keys] = hooked
        return keys

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hooks: Callable[[str, torch.Tensor], torch.Tensor],
        mask: AttentionMask,
    ) -> torch.Tensor:
        """TransformerLens's attention, whatever is hooked: q [batch, pos, n_heads, d_head],
        k/v [batch, key_pos, n_kv_heads, d_head] -> z [batch, pos, n_heads, d_head].

        Grouped-query heads: head ``h`` reads key/value head ``h // group`` (TransformerLens's
        ``repeat_interleave``). Instead of repeating the keys and values — a copy of the whole
        KV cache per layer and decode step — each key/value head multiplies the queries of its
        ``group`` heads stacked as one matrix."""
        batch, query, heads, d_head = q.shape
        kv_heads, key = self.n_kv_heads, k.shape[1]
        group = heads // kv_heads
        # [batch, kv_heads, group * query, d_head]: a group's queries, head-major as the heads.
        q_grouped = q.transpose(1, 2).reshape(batch, kv_heads, group * query, d_head)
        scores = torch.matmul(q_grouped, k.permute(0, 2, 3, 1))  # [batch, kv_heads, g*q, key]
        scores = scores.view(batch, heads, query, key)
        # In place on the fresh product, before any hook sees it: same values, no copies.
        scores.div_(self.attn_scale)
        if self.soft_cap > 0:
            # tanh keeps its output for a backward: scale a new tensor, not that one
            scores = torch.tanh(scores.div_(self.soft_cap)) * self.soft_cap
        blocked = mask.blocked(query, key, q.device)
        if blocked is not None:
            scores.masked_fill_(blocked, float("-inf"))
        scores = hooks(self.names["attn_scores"], scores)  # [batch, n_heads, query, key]
        pattern = torch.softmax(scores, dim=-1)
        # A row with no allowed key is NaN: zero, as TransformerLens (in place on the fresh
        # softmax, unless autograd keeps it for the backward; values elsewhere are in [0, 1],
        # which nan_to_num leaves alone).
        if pattern.requires_grad:
            pattern = pattern.nan_to_num(nan=0.0)
        else:
            pattern = pattern.nan_to_num_(nan=0.0)
        pattern = hooks(self.names["pattern"], pattern)  # [batch, n_heads, query, key]
        pattern = pattern.to(v.dtype).reshape(batch, kv_heads, group * query, key)
        z = torch.matmul(pattern, v.transpose(1, 2))  # [batch, kv_heads, group * query, d_head]
        return z.view(batch, heads, query, d_head).transpose(1, 2)

    def _output(self, z: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        """``z @ W_O + b_O``. ``hook_result`` (each head's ``z @ W_O``) fires when
        ``use_attn_result`` is on or when it is asked for by exact name. With the flag on the
        output is the sum of the results, as in TransformerLens; asked for without it, the sum
        is taken only when a hook function changed a result or a backward pass wants their
        gradient, so capturing or reading them leaves the output's bits as they are."""
        name = self.names["result"]
        flag = self.cfg.use_attn_result
        if not (flag or hooks.asks_for(name)):
            return linear(z.flatten(-2), self.w_o, self.b_o)  # [batch, pos, d_model]
        result = torch.einsum("bphe,hed->bphd", z, self.W_O)  # [batch, pos, n_heads, d_model]
        seen = result.clone() if not flag and name in hooks.fns else result  # edits in place
        hooked = hooks(name, result)
        unchanged = seen is result or torch.equal(hooked, seen)
        if not flag and unchanged and not hooks.wants_gradient(name):
            return linear(z.flatten(-2), self.w_o, self.b_o)
        out = hooked.sum(dim=2)
        return out if self.b_o is None else out + self.b_o


def _span_boxes(spans: list[RowSpan]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Hooks on a pooled step's scores or pattern [rows, heads, 1, width]: each generation's
    run sees its own rows and key columns, a view, so an in-place edit lands in place."""

    def fire(name: str, value: torch.Tensor) -> torch.Tensor:
        for span in spans:
            if span.hooks.wants(name):
                box = value[span.rows, :, :, : span.keys]
                result = span.hooks(name, box)
                if result is not box:
                    value[span.rows, :, :, : span.keys] = result
        return value

    return fire
