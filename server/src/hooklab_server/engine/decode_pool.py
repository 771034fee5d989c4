"""Continuous batching: several generations decode together, one forward per step.

Every generation (a :class:`RowGroup`: the rows of one request) owns rows of a preallocated KV
pool. It joins with its own prefill, a plain cached ``forward`` with its own hooks (TransformerLens
semantics, left padding included), whose keys and values are then copied to columns ``0..T-1`` of
free rows together with its padding mask. Each :meth:`DecodePool.step` runs one forward with one
new token for every active row: row ``r`` writes it at column ``length[r]``, with position id =
the row's real tokens so far, and attends only to its own valid columns. Each generation's hooks
run on its own rows only and see the shapes of its solo decode step. Generations leave between
steps; the rows after them move up, so active rows are always ``0..n-1`` and a step uses views.

    pool = DecodePool(model, max_rows=16, max_positions=256)
    group, logits = pool.join(tokens, mask, fwd_hooks=[("blocks.3.hook_resid_post", steer)])
    state = GenerationState(model, tokens, sampling, stopping)   # the caller samples
    next_tokens = {group: state.choose(logits)}
    while not state.done:
        logits = pool.step(next_tokens)[group]    # with every other group's tokens
        next_tokens[group] = state.choose(logits)
    pool.leave(group)

Numerics: a generation's logits equal its solo ``generate`` within float rounding (~1e-6 in
fp32), not bit for bit: GEMM kernels depend on the row count, and masked key columns change the
attention sums (``scheduling.md`` §3). Rows never influence each other: with the same geometry,
changing one generation's tokens or hooks leaves every other row's bits unchanged, with one
exception: a hook function that edits ``attn.hook_result`` or a per-head input
(``hook_attn_in``, ``hook_q/k/v_input``) moves that layer to TransformerLens's per-head
arithmetic for every row of the step (values of the other rows then move by rounding, ~1e-6).
What a generation captures or only reads never changes any row's bits, its own included. The
pool is not thread-safe; one executor thread owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .components.attention import AttentionMask, PooledKV, RowSpan, head_major
from .hook_points import HookRun, RowHooks
from .model import FwdHooks, HookedTransformer


class PoolFull(RuntimeError):
    """No free rows or key columns for a join, or a generation reached ``max_positions``."""


@dataclass(eq=False)
class RowGroup:
    """One generation's rows ``start:start+size`` of a pool. Each row has used ``length`` key
    columns (the prompt's width, pads included, plus the tokens decoded so far)."""

    start: int  # moves up when an earlier group leaves
    size: int
    length: int
    hooks: HookRun  # the join's hooks: every step uses them unless it is given others
    prompt_width: int = 0  # the join's prefill width (``length`` then)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)


class DecodePool:
    def __init__(self, model: HookedTransformer, max_rows: int, max_positions: int) -> None:
        cfg = model.cfg
        if max_positions > cfg.n_ctx:
            raise ValueError(
                f"max_positions {max_positions} is above the model's n_ctx {cfg.n_ctx}"
            )
        assert cfg.n_key_value_heads is not None  # HookedConfig fills it in
        device = model.device
        self.model, self.max_rows, self.max_positions = model, max_rows, max_positions
        # Keys (after rotary) and values of every layer: [layer, k|v, row, column, kv_head, d_head],
        # laid out head by head (attention reads each head's columns in place).
        shape = (cfg.n_layers, 2, max_rows, max_positions, cfg.n_key_value_heads, cfg.d_head)
        self.kv = head_major(shape, model.embed.W_E, zeros=True)
        self.valid = torch.zeros(max_rows, max_positions, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)  # next column
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)  # next position id
        # Columns of each row that may hold non-zero values. Masked columns are read too, and a
        # stale NaN or inf there would still poison the sums (0 * inf), so rows are kept zero
        # beyond their extent.
        self.extent = [0] * max_rows
        self.groups: list[RowGroup] = []  # in row order
        self._rows = torch.arange(max_rows, device=device)
        self._columns = torch.arange(max_positions, device=device)

    @property
    def active_rows(self) -> int:
        return sum(group.size for group in self.groups)

    @property
    def free_rows(self) -> int:
        return self.max_rows - self.active_rows

    def join(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        fwd_hooks: FwdHooks = (),
        interrupt: Callable[[], None] | None = None,
    ) -> tuple[RowGroup, torch.Tensor]:
        """Prefill a prompt ``tokens`` [batch, pos] alone, as the first step of ``generate``, and
        give it ``batch`` free rows. Returns its group and last-position logits [batch, d_vocab].
        ``fwd_hooks`` apply to the prefill and, unless a step names others, to every step."""
        tokens = tokens if tokens.dim() == 2 else tokens.unsqueeze(0)
        batch, width = tokens.shape
        if batch > self.free_rows:
            raise PoolFull(f"{batch} rows wanted, {self.free_rows} free")
        if width >= self.max_positions:
            raise PoolFull(f"a prompt of {width} tokens leaves no room in {self.max_positions}")
        model = self.model
        hooks = model.hook_run(fwd_hooks, interrupt=interrupt)
        cache = model.init_kv_cache()
        logits = model.last_logits(tokens, attention_mask, cache, hooks=hooks)
        group = RowGroup(self.active_rows, batch, width, hooks, width)
        rows = group.rows
        with torch.inference_mode():
            stale = max(self.extent[rows])
            if stale > width:
                self.kv[:, :, rows, width:stale] = 0.0
            for layer, kv in enumerate(cache.layers):
                assert kv is not None
                self.kv[layer, 0, rows, :width] = kv.keys
                self.kv[layer, 1, rows, :width] = kv.values
            self.valid[rows] = False
            if attention_mask is None:
                self.valid[rows, :width] = True
                self.positions[rows] = width
            else:
                mask = attention_mask.to(self.valid.device).bool()
                self.valid[rows, :width] = mask
                self.positions[rows] = mask.sum(-1)  # the next position counts real tokens only
            self.lengths[rows] = width
        self.extent[rows] = [width] * batch
        self.groups.append(group)
        return group, logits

    def step(
        self,
        next_tokens: Mapping[RowGroup, torch.Tensor],
        hooks: Mapping[RowGroup, FwdHooks | HookRun] | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> dict[RowGroup, torch.Tensor]:
        """One forward of one new token (``next_tokens[group]`` [size]) for every active group;
        returns each group's logits [size, d_vocab]. ``hooks`` replaces a group's hooks for this
        step (an empty list: none); the others keep their join's. ``interrupt`` is called before
        every block; raising from it abandons the step, which may then be run again."""
        if set(next_tokens) != set(self.groups):
            raise ValueError("a step needs the next tokens of every active group, and only those")
        if not self.groups:
            return {}
        full = [group for group in self.groups if group.length >= self.max_positions]
        if full:
            raise PoolFull(f"{len(full)} group(s) used all {self.max_positions} columns")
        switch = self.model.cfg.longrope_original_ctx_len
        if switch is not None and any(
            group.prompt_width <= switch <= group.length for group in self.groups
        ):
            # Past longrope's original context every position takes the long factors, so keys
            # cached with the short ones go stale: generate alone recomputes its cache then; a
            # pooled row cannot.
            raise PoolFull(f"a longrope generation crossed its original context ({switch})")
        model, n = self.model, self.active_rows
        given = hooks or {}
        spans = [
            RowSpan(group.rows, group.length + 1, self._hook_run(given.get(group, group.hooks)))
            for group in self.groups
        ]
        row_hooks = RowHooks([(span.rows, span.hooks) for span in spans], interrupt)
        width = max(group.length for group in self.groups) + 1
        with torch.inference_mode():
            tokens = torch.cat([next_tokens[group].reshape(group.size) for group in self.groups])
            rows, columns = self._rows[:n], self.lengths[:n].clone()
            self.valid[rows, columns] = True
            valid = self.valid[:n, :width]
            masks = {}  # by attention window (None: global), as the layers use them
            for window in set(model.windows):
                allowed = valid
                if window is not None:
                    # A row's columns are its positions in the solo forward, pads included, so
                    # a window over columns is the solo forward's window.
                    allowed = allowed & (self._columns[:width] > (columns - window)[:, None])
                masks[window] = AttentionMask(allowed[:, None, None, :])  # [rows, 1, query, key]
            kv = [
                PooledKV(self.kv[layer, 0], self.kv[layer, 1], rows, columns, width, spans)
                for layer in range(model.cfg.n_layers)
            ]
            for group in self.groups:  # before the forward: an interrupted step wrote there too
                self.extent[group.rows] = [
                    max(group.length + 1, e) for e in self.extent[group.rows]
                ]
            logits = model._decode_pooled(
                tokens.to(self.kv.device), self.positions[:n], masks, kv, row_hooks
            )
            self.lengths[:n] += 1
            self.positions[:n] += 1
        for group in self.groups:
            group.length += 1
        return {group: logits[group.rows] for group in self.groups}

    def leave(self, group: RowGroup) -> None:
        """Free a group's rows; the rows after it move up to close the gap."""
        if group not in self.groups:
            raise ValueError("this group is not in the pool")
        index = self.groups.index(group)
        n, size = self.active_rows, group.size
        later = self.groups[index + 1 :]
        if later:
            source, target = slice(group.start + size, n), slice(group.start, n - size)
            # Copy as many columns as either side may have used, so no stale value survives.
            width = max(self.extent[group.start : n])
            with torch.inference_mode():
                self.kv[:, :, target, :width] = self.kv[:, :, source, :width].clone()
                for table in (self.valid, self.lengths, self.positions):
                    table[target] = table[source].clone()
            self.extent[target] = self.extent[source]
            for moved in later:
                moved.start -= size
        del self.groups[index]

    def _hook_run(self, hooks: FwdHooks | HookRun) -> HookRun:
        return hooks if isinstance(hooks, HookRun) else self.model.hook_run(hooks)
