"""The MLP and the gated MLP (Llama family), with TransformerLens's hook points."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..catalogue import module_hooks
from ..hook_points import HookRun
from .fused import RowConcat
from .linear import linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported act_fn {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``post = act(x @ W_in + b_in)``; gated: ``post = act(x @ W_gate) * (x @ W_in) + b_in``."""

    # Gated: gate and up through one matmul (components/fused.py); False runs two (for tests).
    fuse: ClassVar[bool] = True

    def __init__(
        self, d_model: int, d_mlp: int, act_fn: str, gated: bool, layer: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.act = activation(act_fn)
        self.w_in = nn.Parameter(torch.empty(d_mlp, d_model, dtype=dtype))
        self.w_gate = nn.Parameter(torch.empty(d_mlp, d_model, dtype=dtype)) if gated else None
        self.w_out = nn.Parameter(torch.empty(d_model, d_mlp, dtype=dtype))
        self.b_in: nn.Parameter | None = None
        self._gate_up = RowConcat()
        self.b_out: nn.Parameter | None = None
        names = module_hooks(f"blocks.{layer}.mlp")
        self.pre_name, self.post_name = names["pre"], names["post"]
        self.pre_linear_name = names["pre_linear"]

    @property
    def W_in(self) -> torch.Tensor:
        return self.w_in.T  # [d_model, d_mlp]

    @property
    def W_gate(self) -> torch.Tensor | None:
        return None if self.w_gate is None else self.w_gate.T

    @property
    def W_out(self) -> torch.Tensor:
        return self.w_out.T  # [d_mlp, d_model]

    def forward(self, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        if self.w_gate is None:
            pre = hooks(self.pre_name, linear(x, self.w_in, self.b_in))  # [batch, pos, d_mlp]
            post = self.act(pre)
        else:
            if self.fuse:  # one matmul for gate and up; the hooks see views of its columns
                gate_up = linear(x, self._gate_up((self.w_gate, self.w_in)))
                gate, up = gate_up.split(self.w_in.shape[0], dim=-1)
            else:
                gate, up = linear(x, self.w_gate), linear(x, self.w_in)
            pre = hooks(self.pre_name, gate)  # [batch, pos, d_mlp]
            pre_linear = hooks(self.pre_linear_name, up)  # [batch, pos, d_mlp]
            post = self.act(pre) * pre_linear
            if self.b_in is not None:
                post = post + self.b_in
        post = hooks(self.post_name, post)  # [batch, pos, d_mlp]
        return linear(post, self.w_out, self.b_out)  # [batch, pos, d_model]
