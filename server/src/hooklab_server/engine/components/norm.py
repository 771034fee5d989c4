"""LayerNorm / RMSNorm and their weightless "Pre" variants, with TransformerLens's hooks.

``hook_scale`` is the divisor ``[batch, pos, 1]`` and ``hook_normalized`` the value before the
weight and bias ``[batch, pos, length]`` (TransformerLens 3.x semantics). Statistics are computed
in float32 for half-precision models, as TransformerLens does.

Always TransformerLens's formula, never the fused ``F.layer_norm`` / ``F.rms_norm`` kernels: those
round differently (another variance, a reciprocal square root), so a norm that switched to them
when its hooks are not wanted would make a run's numbers depend on what it captures. Measured on
a gpt2-small-sized model the fused kernels saved nothing worth that (bench/capture_invariance.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..catalogue import module_hooks

_WIDE = (torch.float32, torch.float64)


class Norm(nn.Module):
    def __init__(self, kind: str, length: int, eps: float, prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        if kind not in ("LN", "LNPre", "RMS", "RMSPre"):
            raise ValueError(f"unknown normalization_type {kind!r}")
        self.kind = kind
        self.length = length
        self.eps = eps
        self.centre = kind in ("LN", "LNPre")
        self.w = nn.Parameter(torch.ones(length, dtype=dtype)) if kind in ("LN", "RMS") else None
        self.b = nn.Parameter(torch.zeros(length, dtype=dtype)) if kind == "LN" else None
        names = module_hooks(prefix)
        self.scale_name, self.normalized_name = names["scale"], names["normalized"]

    def forward(
        self, x: torch.Tensor, hooks: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        dtype = x.dtype
        if dtype not in _WIDE:
            x = x.float()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        scale = hooks(self.scale_name, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = hooks(self.normalized_name, x / scale).to(dtype)  # [batch, pos, length]
        if self.w is not None:
            x = x * self.w
        if self.b is not None:
            x = x + self.b
        return x
