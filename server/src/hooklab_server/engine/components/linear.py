"""The engine's one projection, ``x @ weight.T + bias``, on the fastest kernel that serves it.

On the CPU in float32 without autograd that is oneDNN's matmul rather than MKL's ``F.linear``:
measured here (bench/engine.py, gpt2-small shapes, one thread) it takes about 0.8x the time of
the block projections and half that of the [d_model, 50k] unembedding, whose ``F.linear``
falls off MKL's fast path. Every run — plain, capturing, with read-only hooks — takes the same
kernel for the same shapes, so what a run captures never changes its bits. Where autograd must
record the product (a gradient run past its first hooked point) ``F.linear`` serves: oneDNN's op
has no backward. Half precision and other devices keep ``F.linear`` (cuBLAS on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] -> [..., out]."""
    if (
        _ONEDNN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        if torch.compiler.is_compiling():  # engine/compiled.py: the same kernel, opaque
            return _onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# Inductor lowers the oneDNN op only for weights frozen into the graph (one graph per layer);
# as a custom op it stays a call of the same kernel on the weights passed in (measured on
# gpt2-small 1x128: F.linear in the graph instead made the compiled forward ~20% slower).
@torch.library.custom_op("hooklab::onednn_linear", mutates_args=())
def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
