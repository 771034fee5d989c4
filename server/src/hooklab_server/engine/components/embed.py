"""Token embedding, learned absolute positions and the unembedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hook_points import HookRun
from .linear import linear


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model, dtype=dtype))

    def forward(self, tokens: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        return hooks("hook_embed", F.embedding(tokens, self.W_E))  # [batch, pos, d_model]


class PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model, dtype=dtype))

    def forward(
        self, positions: torch.Tensor, batch: int, padding: torch.Tensor | None, hooks: HookRun
    ) -> torch.Tensor:
        """``positions`` [pos] or [batch, pos]; pad positions (``padding`` True) embed to zero."""
        pos_embed = self.W_pos[positions]
        if pos_embed.dim() == 2:
            pos_embed = pos_embed.expand(batch, -1, -1)
        if padding is not None:
            pos_embed = pos_embed.masked_fill(padding.unsqueeze(-1), 0.0)
        return hooks("hook_pos_embed", pos_embed)  # [batch, pos, d_model]


class Unembed(nn.Module):
    """``x @ W_U + b_U``; with ``soft_cap`` > 0 (Gemma 2) the logits are ``c * tanh(l / c)``,
    after ``unembed.hook_out`` (which sees them uncapped, as in TransformerLens)."""

    def __init__(
        self, d_model: int, d_vocab_out: int, dtype: torch.dtype, soft_cap: float = -1.0
    ) -> None:
        super().__init__()
        # Stored as F.linear wants it, [d_vocab_out, d_model]; W_U is the transposed view.
        self.w_u = nn.Parameter(torch.empty(d_vocab_out, d_model, dtype=dtype))
        self.b_u: nn.Parameter | None = None
        self.soft_cap = soft_cap

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        return self.soft_cap * torch.tanh(logits / self.soft_cap) if self.soft_cap > 0 else logits

    @property
    def W_U(self) -> torch.Tensor:
        return self.w_u.T

    def forward(self, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        x = hooks("unembed.hook_in", x)  # [batch, pos, d_model]
        logits = hooks("unembed.hook_out", linear(x, self.w_u, self.b_u))
        return self._capped(logits)  # [batch, pos, d_vocab]

    def last_position(self, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        """The last position's logits [batch, d_vocab] of ``x`` [batch, pos, d_model], with the
        hook points of a full unembedding, in the same bits whether or not they are hooked.

        Only the last row is multiplied (the others would cost a quarter of a short prefill).
        A ``hook_out`` hook still sees every position's logits, with the last row taken from
        that one-row product (a product of another row count may round differently), so a hook
        that only reads changes nothing."""
        x = hooks("unembed.hook_in", x)  # [batch, pos, d_model]
        last = linear(x[:, -1:], self.w_u, self.b_u)  # [batch, 1, d_vocab]
        if hooks.wants("unembed.hook_out"):
            logits = linear(x, self.w_u, self.b_u)
            logits[:, -1:] = last
            last = hooks("unembed.hook_out", logits)[:, -1:]  # hooks see [batch, pos, d_vocab]
        return self._capped(last[:, -1])
