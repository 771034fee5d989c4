"""Gradients on activations equal TransformerLens 3.9's on the same weights.

``run_with_cache(incl_bwd=True)`` backpropagates a scalar and caches ``{name}_grad`` at every
hook point; backward hooks see, and may replace, the gradient at their point. TransformerLens is
run the way its users do: ``add_hook(..., dir="bwd")`` and ``loss.backward()``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import assert_close, our_model, sample_tokens, tl_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Hook = Callable[..., Any]


def _tl_grads(
    tl: Any,
    tokens: torch.Tensor,
    bwd_hooks: list[tuple[str, Hook]] = (),  # type: ignore[assignment]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TransformerLens's loss and its ``_grad`` cache, with backward hooks added first."""
    tl.reset_hooks()
    for name, fn in bwd_hooks:
        tl.add_hook(name, fn, dir="bwd")
    try:
        loss, cache = tl.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    finally:
        tl.reset_hooks()
    return loss.detach(), {name: value for name, value in cache.items()}


def _zero_heads(grad: torch.Tensor, hook: Any, head: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:, :, head] = 0.0
    return grad


def _scale(grad: torch.Tensor, hook: Any, factor: float) -> torch.Tensor:
    return grad * factor


def _zero_in_place(grad: torch.Tensor, hook: Any) -> None:
    grad[:, 0] = 0.0


def test_incl_bwd_gradients_match_tl(any_checkpoint: Path) -> None:
    ours, tl = our_model(any_checkpoint), tl_model(any_checkpoint)
    tokens = sample_tokens(any_checkpoint, batch=2, length=7)
    loss, cache = ours.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    ref_loss, ref = _tl_grads(tl, tokens)
    assert_close(loss, ref_loss, "loss")
    grads = {name for name in ref if name.endswith("_grad")}
    assert grads, "TransformerLens cached no gradients"
    assert {name for name in cache if name.endswith("_grad")} == grads
    for name in sorted(grads):
        assert_close(cache[name], ref[name], name, atol=1e-4)
    # The forward entries are the plain run_with_cache's.
    for name in ref:
        if not name.endswith("_grad"):
            assert_close(cache[name], ref[name], name, atol=1e-4)


@pytest.mark.parametrize(
    "where, hook",
    [
        ("blocks.1.attn.hook_z", partial(_zero_heads, head=1)),
        ("blocks.1.hook_attn_out", partial(_scale, factor=0.5)),
        ("blocks.0.hook_mlp_out", partial(_scale, factor=0.0)),
        ("blocks.1.hook_resid_pre", _zero_in_place),
    ],
    ids=["zero-head", "scale", "zero", "in-place"],
)
def test_backward_hooks_change_upstream_gradients_as_in_tl(
    any_checkpoint: Path, where: str, hook: Hook
) -> None:
    ours, tl = our_model(any_checkpoint), tl_model(any_checkpoint)
    tokens = sample_tokens(any_checkpoint, batch=2, length=6)
    _, cache = ours.run_with_cache(
        tokens, return_type="loss", incl_bwd=True, bwd_hooks=[(where, hook)]
    )
    _, plain = ours.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    _, ref = _tl_grads(tl, tokens, [(where, hook)])
    changed = 0
    for name in sorted(n for n in ref if n.endswith("_grad")):
        assert_close(cache[name], ref[name], name, atol=1e-4)
        changed += not torch.allclose(cache[name], plain[name])
    assert changed, "the backward hook changed no gradient"


def test_two_backward_hooks_at_one_point_as_in_tl(gpt2_checkpoint: Path) -> None:
    """Both see the incoming gradient; the last one returning a tensor sets what flows on."""
    ours, tl = our_model(gpt2_checkpoint), tl_model(gpt2_checkpoint)
    tokens = sample_tokens(gpt2_checkpoint, batch=1, length=5)
    seen: list[torch.Tensor] = []

    def record(grad: torch.Tensor, hook: Any) -> None:
        seen.append(grad.clone())

    where = "blocks.1.hook_resid_pre"
    hooks = [
        (where, partial(_scale, factor=3.0)),
        (where, record),
        (where, partial(_scale, factor=-1.0)),
    ]
    _, cache = ours.run_with_cache(tokens, return_type="loss", incl_bwd=True, bwd_hooks=hooks)
    ours_seen = seen.pop()
    _, ref = _tl_grads(tl, tokens, hooks)
    assert_close(ours_seen, seen.pop(), "gradient seen by the second hook")
    for name in sorted(n for n in ref if n.endswith("_grad")):
        assert_close(cache[name], ref[name], name, atol=1e-4)


def test_gradients_at_conditional_points_as_tl_with_its_flags_on(any_checkpoint: Path) -> None:
    """Asked for by exact name, the per-head inputs and head results get the gradients
    TransformerLens gives them with ``use_split_qkv_input`` / ``use_attn_result`` on (the block
    then computes from them, as TL does with the flag)."""
    ours, tl = our_model(any_checkpoint), tl_model(any_checkpoint)
    tokens = sample_tokens(any_checkpoint, batch=2, length=6)
    names = [
        f"blocks.{layer}.{point}"
        for layer in range(ours.cfg.n_layers)
        for point in ("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result")
    ]
    _, cache = ours.run_with_cache(tokens, names_filter=names, return_type="loss", incl_bwd=True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_attn_result(True)
    try:
        _, ref = _tl_grads(tl, tokens)
    finally:
        tl.set_use_split_qkv_input(False)
        tl.set_use_attn_result(False)
    for name in names:
        assert_close(cache[f"{name}_grad"], ref[f"{name}_grad"], f"{name}_grad", atol=1e-4)
