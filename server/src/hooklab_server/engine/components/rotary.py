"""Rotary position embeddings (NeoX "rotate half" or GPT-J adjacent pairs) on the first
``rotary_dim`` dimensions of each head, with TransformerLens's angle formula.

Scaled variants (Hugging Face's ``rope_scaling``): ``linear`` divides every angle by a factor;
``llama3`` (TransformerLens's "NTK by parts") divides the low frequencies by the factor, keeps
the high ones and interpolates between; ``yarn`` does the same over a range of rotations
(``beta_fast`` to ``beta_slow`` in the original context) and scales cos and sin;
``longrope`` (Phi-3) divides each frequency by its own factor, one set for sequences up to the
original context and another for longer ones, and multiplies cos and sin by an attention
factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import HookedConfig


@dataclass(frozen=True)
class RopeScaling:
    """How one layer's rotary frequencies are scaled; the defaults scale nothing. Hashable, so
    that layers with the same base and scaling share one table."""

    linear_factor: float = 1.0
    # llama3: (factor, low_freq_factor, high_freq_factor, original context length)
    llama3: tuple[float, float, float, int] | None = None
    # yarn: (factor, beta_fast, beta_slow, original context length, truncate)
    yarn: tuple[float, float, float, int, bool] | None = None
    # longrope: per-frequency divisors up to / beyond ``original_ctx`` positions
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_ctx: int | None = None
    attention_factor: float = 1.0


def layer_scaling(cfg: HookedConfig, layer: int) -> RopeScaling:
    """The scaling a layer's rotary uses. As TransformerLens, ``rotary_scaling_factor`` skips
    the layers ``attn_types`` calls local (Gemma 3's sliding layers keep their own base)."""
    local = cfg.attn_types is not None and cfg.attn_types[layer] == "local"
    llama3 = None
    if cfg.use_NTK_by_parts_rope:
        llama3 = (
            cfg.NTK_by_parts_factor,
            cfg.NTK_by_parts_low_freq_factor,
            cfg.NTK_by_parts_high_freq_factor,
            cfg.NTK_original_ctx_len,
        )
    yarn = None
    if cfg.use_yarn_rope:
        yarn = (
            cfg.yarn_factor,
            cfg.yarn_beta_fast,
            cfg.yarn_beta_slow,
            cfg.yarn_original_max_position_embeddings,
            cfg.yarn_truncate,
        )
    short, long = cfg.longrope_short_factor, cfg.longrope_long_factor
    return RopeScaling(
        linear_factor=1.0 if local else cfg.rotary_scaling_factor,
        llama3=llama3,
        yarn=yarn,
        short_factor=tuple(short) if short is not None else None,
        long_factor=tuple(long) if long is not None else None,
        original_ctx=cfg.longrope_original_ctx_len,
        attention_factor=(
            cfg.yarn_attention_factor if cfg.use_yarn_rope else cfg.longrope_attention_factor
        ),
    )


def _wavelengths(
    rotary_dim: int, base: float, scaling: RopeScaling, wide: torch.dtype, long: bool = False
) -> torch.Tensor:
    """TransformerLens's ``freq`` per rotated pair ([rotary_dim // 2]): angle = position / freq."""
    if scaling.llama3 is not None:
        factor, low_factor, high_factor, old_ctx = scaling.llama3
        # Inverse frequencies in float32 from integer exponents, as HF and TL compute them.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv = 1.0 / base**exponents
        wavelen = 2 * math.pi / inv
        # Long wavelengths (beyond old_ctx / low_factor) are interpolated by the factor, short
        # ones (below old_ctx / high_factor) kept, those between blended smoothly.
        scaled = torch.where(wavelen > old_ctx / low_factor, inv / factor, inv)
        smooth = (old_ctx / wavelen - low_factor) / (high_factor - low_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high_factor) & (wavelen <= old_ctx / low_factor)
        return 1.0 / torch.where(medium, blended, scaled).to(wide)
    if scaling.yarn is not None:
        return 1.0 / _yarn_inverse_frequencies(rotary_dim, base, *scaling.yarn).to(wide)
    freq = base ** (torch.arange(rotary_dim // 2, dtype=wide) / (rotary_dim / 2))
    factors = scaling.long_factor if long else scaling.short_factor
    if factors is not None:
        if len(factors) != rotary_dim // 2:
            raise ValueError(
                f"longrope has {len(factors)} factors for {rotary_dim // 2} rotary frequencies"
            )
        freq = freq * torch.tensor(factors, dtype=torch.float32).to(wide)
    return freq * scaling.linear_factor


def _yarn_inverse_frequencies(
    rotary_dim: int,
    base: float,
    factor: float,
    beta_fast: float,
    beta_slow: float,
    original: int,
    truncate: bool,
) -> torch.Tensor:
    """YaRN's inverse frequencies (float32, as HF): pairs that turn more than ``beta_fast``
    times over the original context keep their frequency, those turning fewer than
    ``beta_slow`` times are divided by ``factor``, the ones between are blended linearly."""

    def pair_turning(rotations: float) -> float:  # the pair index turning this many times
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    return inv / factor * ramp + inv * (1 - ramp)


class Rotary(nn.Module):
    cos: torch.Tensor  # [n_ctx, rotary_dim], a non-persistent buffer
    sin: torch.Tensor
    long_cos: torch.Tensor | None  # longrope: the tables beyond the original context
    long_sin: torch.Tensor | None

    def __init__(
        self,
        rotary_dim: int,
        n_ctx: int,
        base: float,
        adjacent_pairs: bool,
        dtype: torch.dtype,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.adjacent_pairs = adjacent_pairs
        scaling = scaling or RopeScaling()
        self.switch = scaling.original_ctx  # longrope: longer sequences use the long tables
        cos, sin = self._tables(rotary_dim, n_ctx, base, scaling, dtype, long=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        long_cos = long_sin = None
        if scaling.long_factor is not None:
            if self.switch is None:
                raise ValueError("longrope needs the original context length")
            long_cos, long_sin = self._tables(rotary_dim, n_ctx, base, scaling, dtype, long=True)
        self.register_buffer("long_cos", long_cos, persistent=False)
        self.register_buffer("long_sin", long_sin, persistent=False)

    def _tables(
        self,
        rotary_dim: int,
        n_ctx: int,
        base: float,
        scaling: RopeScaling,
        dtype: torch.dtype,
        long: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        freq = _wavelengths(rotary_dim, base, scaling, wide, long)
        freq = freq.repeat_interleave(2) if self.adjacent_pairs else freq.repeat(2)
        angles = torch.arange(n_ctx, dtype=wide)[:, None] / freq[None, :]  # [n_ctx, rotary_dim]
        # longrope's attention factor scales q and k alike (HF multiplies cos and sin by it).
        factor = scaling.attention_factor
        return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.adjacent_pairs:
            pairs = x.unflatten(-1, (-1, 2))
            return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos[positions], self.sin[positions]  # [(batch,) pos, rotary_dim]
        if self.long_cos is None or self.long_sin is None:
            return cos, sin
        assert self.switch is not None
        # As HF: a forward whose last position lies beyond the original context rotates every
        # position with the long factors. Decided per row (a pooled decode step mixes
        # generations); no host sync.
        long = (positions.amax(-1, keepdim=True) + 1 > self.switch)[..., None]
        return (
            torch.where(long, self.long_cos[positions], cos),
            torch.where(long, self.long_sin[positions], sin),
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [batch, pos, heads, d_head] at ``positions`` ([pos] or [batch, pos])."""
        cos, sin = self._cos_sin(positions)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(batch,) pos, 1, rotary_dim]
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        rotated = rot * cos + self._rotate(rot) * sin
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
