"""The model's normalisation layers (LN / LNPre / RMS / RMSPre), run locally on the client.

The cache needs them where TransformerLens calls ``model.ln_final(...)`` itself: re-normalising
each component of a residual stack with its own statistics (logit lens). Weights come from the
model's ``parameter(name)`` (``"ln_final.w"``, ``"blocks.3.ln2.b"``); a processed model has none
(folded into the next layer), which is exactly the ``…Pre`` variants.

Numerics follow TransformerLens: statistics in float32 when the model runs in fp16/bf16, the
normalised value cast back to the model dtype before the weight and bias are applied.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

NormalizationType = Literal["LN", "LNPre", "RMS", "RMSPre"]
NORM_TYPES: tuple[str, ...] = ("LN", "LNPre", "RMS", "RMSPre")


def normalize(
    x: torch.Tensor,
    normalization_type: str,
    eps: float,
    w: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise over the last axis: ``[..., d] -> [..., d]``.

    LN centres then divides by ``sqrt(mean(x²) + eps)``; RMS only divides. ``w`` (and ``b``) are
    applied afterwards when given; "…Pre" types have none.
    """
    if normalization_type not in NORM_TYPES:
        raise ValueError(f"unknown normalization_type {normalization_type!r}")
    out_dtype = x.dtype
    if out_dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if normalization_type.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [..., 1]
    x = (x / scale).to(out_dtype)
    if w is not None:
        x = x * w
    if b is not None:
        x = x + b
    return x


def _optional_parameter(model: Any, name: str) -> torch.Tensor | None:
    try:
        parameter: torch.Tensor = model.parameter(name)
    except KeyError:
        return None
    return parameter


def norm_type(cfg: Any, module: str = "ln_final") -> str | None:
    """The type of a norm module (``"ln_final"``, ``"blocks.3.ln1"``): the model's, except that
    ``ln_final`` of a ``final_rms`` LN model is RMS (as in TransformerLens)."""
    kind: str | None = cfg.normalization_type
    if module == "ln_final" and kind in ("LN", "LNPre") and getattr(cfg, "final_rms", False):
        return "RMS" if kind == "LN" else "RMSPre"
    return kind


def apply_norm(model: Any, x: torch.Tensor, module: str = "ln_final") -> torch.Tensor:
    """``model.<module>(x)`` without the model's modules: ``[..., d_model] -> [..., d_model]``.

    ``module`` is a TransformerLens module path: ``"ln_final"``, ``"blocks.{L}.ln1"`` or
    ``"blocks.{L}.ln2"``. No normalisation (type None) returns ``x`` unchanged.
    """
    kind = norm_type(model.cfg, module)
    if kind is None:
        return x
    w = b = None
    if kind in ("LN", "RMS"):
        w = _optional_parameter(model, f"{module}.w")
        b = _optional_parameter(model, f"{module}.b") if kind == "LN" else None
    w = w.to(x.device) if w is not None else None
    b = b.to(x.device) if b is not None else None
    return normalize(x, kind, model.cfg.eps, w, b)
