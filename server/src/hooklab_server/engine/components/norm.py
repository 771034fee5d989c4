"""LayerNorm / RMSNorm and their weightless "Pre" variants, with TransformerLens's hooks.

``hook_scale`` is the divisor ``[batch, pos, 1]`` and ``hook_normalized`` the value before the
weight and bias ``[batch, pos, length]`` (TransformerLens 3.x semantics). Statistics are computed
in float32 for half-precision models, as TransformerLens does. When neither hook is wanted the
fused ``F.layer_norm`` / ``F.rms_norm`` kernels do the same arithmetic faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..catalogue import module_hooks
from ..hook_points import HookRun

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

    def hooked(self, hooks: HookRun) -> bool:
        return hooks.wants(self.scale_name) or hooks.wants(self.normalized_name)

    def forward(self, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        if not self.hooked(hooks):
            return self._fused(x)
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

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wide = x if dtype in _WIDE else x.float()
        shape = (self.length,)
        if self.centre:
            out = F.layer_norm(wide, shape, eps=self.eps).to(dtype)
        else:
            out = F.rms_norm(wide, shape, eps=self.eps).to(dtype)
        if self.w is not None:
            out = out * self.w
        if self.b is not None:
            out = out + self.b
        return out
