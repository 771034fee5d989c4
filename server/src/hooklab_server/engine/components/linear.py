"""The engine's one projection, ``x @ weight.T + bias``, on the fastest kernel that serves it.

On the CPU in float32 without autograd that is oneDNN's matmul rather than MKL's ``F.linear``:
measured here (gpt2-small shapes, one thread) it takes about 0.8x the time of the block
projections of a prompt and half that of the [d_model, 50k] unembedding, whose ``F.linear``
falls off MKL's fast path. Every run — plain, capturing, with read-only hooks — takes the same
kernel for the same shapes, so what a run captures never changes its bits. Where autograd must
record the product (a gradient run past its first hooked point) ``F.linear`` serves: oneDNN's op
has no backward. Half precision and other devices keep ``F.linear`` (cuBLAS on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# MKL computes a product of a few rows (a decode step) on one thread, oneDNN on every thread; on
# a busy machine a parallel call can wait a scheduler slice for its second thread (measured here
# under load: 6 ms for a 1 x 3072 -> 768 product, against MKL's 0.26 ms). Few-row products stay
# with MKL unless the weight is as wide as an unembedding, whose product is long either way.
_MIN_ROWS = 8
_WIDE_OUT = 16384


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] -> [..., out]."""
    if (
        _ONEDNN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and (x.numel() >= _MIN_ROWS * x.shape[-1] or weight.shape[0] >= _WIDE_OUT)
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
