"""Rotary position embeddings (NeoX "rotate half" or GPT-J adjacent pairs) on the first
``rotary_dim`` dimensions of each head, with TransformerLens's angle formula."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    cos: torch.Tensor  # [n_ctx, rotary_dim], a non-persistent buffer
    sin: torch.Tensor

    def __init__(
        self, rotary_dim: int, n_ctx: int, base: float, adjacent_pairs: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.adjacent_pairs = adjacent_pairs
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        freq = base ** (torch.arange(rotary_dim // 2, dtype=wide) / (rotary_dim / 2))
        freq = freq.repeat_interleave(2) if adjacent_pairs else freq.repeat(2)
        angles = torch.arange(n_ctx, dtype=wide)[:, None] / freq[None, :]  # [n_ctx, rotary_dim]
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.adjacent_pairs:
            pairs = x.unflatten(-1, (-1, 2))
            return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [batch, pos, heads, d_head] at ``positions`` ([pos] or [batch, pos])."""
        cos = self.cos[positions].unsqueeze(-2)  # [(batch,) pos, 1, rotary_dim]
        sin = self.sin[positions].unsqueeze(-2)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        rotated = rot * cos + self._rotate(rot) * sin
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
