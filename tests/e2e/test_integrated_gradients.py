"""Integrated gradients on the server against the same path integral computed with
TransformerLens 3.9 step by step: at each midpoint, a forward hook puts the interpolated
activation in place, a backward hook reads its gradient, ``metric(logits).backward()``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hooklab import metrics
from hooklab.errors import ServerError

from .e2e_servers import Served, sample_tokens
from .test_gradients import ANSWER, WRONG, logit_diff

ATOL = 1e-4


def tl_integrated_gradients(
    tl: Any,
    tokens: torch.Tensor,
    hook: str,
    steps: int,
    baseline: torch.Tensor | None = None,
    positions: list[int] | None = None,
) -> torch.Tensor:
    _, cache = tl.run_with_cache(tokens, names_filter=hook)
    start = cache[hook]
    base = torch.zeros_like(start) if baseline is None else baseline.expand_as(start)
    moved = torch.zeros_like(start, dtype=torch.bool)
    moved[:, positions if positions is not None else slice(None)] = True
    total = torch.zeros_like(start)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        point = torch.where(moved, base + alpha * (start - base), start)
        grads: list[torch.Tensor] = []
        tl.reset_hooks()
        # Connected to the activation (a full backward hook fires only if its input gets a
        # gradient), with the interpolated values.
        tl.add_hook(hook, lambda act, hook, point=point: act + (point - act).detach(), dir="fwd")
        tl.add_hook(hook, lambda grad, hook, grads=grads: grads.append(grad.detach()), dir="bwd")
        try:
            logit_diff(tl(tokens)).backward()
        finally:
            tl.reset_hooks()
            tl.zero_grad(set_to_none=True)
        total += grads[0]
    return torch.where(moved, (start - base) * total / steps, torch.zeros_like(start))


@pytest.mark.parametrize("hook", ["hook_embed", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
def test_integrated_gradients_match_the_path_integral_in_tl(server: Served, hook: str) -> None:
    tokens = sample_tokens(server.tl, batch=2, pos=5, seed=30)
    ours = server.model.integrated_gradients(
        tokens, metrics.logit_diff(ANSWER, WRONG), hook=hook, steps=8
    )
    expected = tl_integrated_gradients(server.tl, tokens, hook, 8)
    torch.testing.assert_close(ours.attributions, expected, atol=ATOL, rtol=0)


def test_an_input_span_with_a_baseline_prompt_and_a_traced_metric(gpt2_server: Served) -> None:
    """Only the span moves, from another prompt's embeddings; the metric is a Python function."""
    tl = gpt2_server.tl
    tokens = sample_tokens(tl, batch=2, pos=6, seed=31)
    other = sample_tokens(tl, batch=2, pos=6, seed=32)
    ours = gpt2_server.model.integrated_gradients(
        tokens, logit_diff, steps=6, baseline_input=other, positions=[1, 2]
    )
    _, cache = tl.run_with_cache(other, names_filter="hook_embed")
    expected = tl_integrated_gradients(tl, tokens, "hook_embed", 6, cache["hook_embed"], [1, 2])
    torch.testing.assert_close(ours.attributions, expected, atol=ATOL, rtol=0)
    assert ours.attributions[:, [0, 3, 4, 5]].abs().max() == 0


def test_completeness_with_many_steps(gpt2_server: Served) -> None:
    """The attributions add up to the metric's change from the baseline to the input (the
    axiom that makes integrated gradients useful), ever closer with more steps; the steps run
    in several chunks when the memory budget asks for it (as here: small budget)."""
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=33)
    metric = metrics.logit_diff(ANSWER[:1], WRONG[:1])
    coarse = gpt2_server.model.integrated_gradients(tokens, metric, steps=4)
    fine = gpt2_server.model.integrated_gradients(tokens, metric, steps=256)
    logits = gpt2_server.tl(tokens).detach()
    value = float(logits[0, -1, ANSWER[0]] - logits[0, -1, WRONG[0]])
    assert fine.value == pytest.approx(value, abs=ATOL)
    assert abs(fine.convergence_delta) < 0.02 * abs(value - fine.baseline_value) + 1e-3
    assert abs(fine.convergence_delta) <= abs(coarse.convergence_delta) + 1e-6
    assert fine.attributions.sum().item() == pytest.approx(
        fine.value - fine.baseline_value + fine.convergence_delta, abs=1e-4
    )


@pytest.mark.parametrize(
    "body, words",
    [
        ({"hook": "blocks.9.hook_resid_pre"}, "unknown hook"),
        ({"hook": "blocks.*.hook_resid_pre"}, "one hook point"),
        ({"positions": [7]}, "outside"),
        ({"metric": {"kind": "logits"}}, "not a scalar"),
        ({"baseline": {"dtype": "F32", "shape": [3], "data": [1, 2, 3]}}, "broadcast"),
        ({"steps": 0}, "steps"),
    ],
    ids=["unknown-hook", "glob", "position", "logits", "baseline-shape", "steps"],
)
def test_bad_requests_are_refused_before_running(
    gpt2_server: Served, body: dict[str, Any], words: str
) -> None:
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5)
    request = {"input": tokens, "metric": {"kind": "logit", "answer": 3}, **body}
    with pytest.raises(ServerError, match=words):
        gpt2_server.model._transport.frames("POST", "/v1/integrated_gradients", request)
