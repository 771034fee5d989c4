"""Gradients on the server against TransformerLens 3.9 on the same weights: ``run_with_cache``
with ``incl_bwd`` (from the loss, each declarative metric and a traced Python metric), backward
hooks (specs, traced functions, callbacks), the attribution-patching demo's own pattern, and
isolation between concurrent users. Every reference is TransformerLens run the way its users
do: backward hooks added with ``add_hook(..., dir="bwd")`` and ``value.backward()``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hooklab import hooks, metrics
from hooklab.errors import ServerError

from .e2e_servers import Served, sample_tokens

ATOL = 1e-4
ANSWER, WRONG = [5, 7], [9, 11]
Objective = Callable[[torch.Tensor], torch.Tensor]


def tl_backward(
    tl: Any,
    tokens: torch.Tensor,
    objective: Objective | None,
    bwd_hooks: list[tuple[str, Callable[..., Any]]] = (),  # type: ignore[assignment]
) -> tuple[float, dict[str, torch.Tensor]]:
    """TransformerLens: forward and gradient caches through hooks, ``objective(logits)`` (None:
    the loss) backpropagated. Returns the objective's value and ``{name}`` / ``{name}_grad``."""
    cache: dict[str, torch.Tensor] = {}
    tl.reset_hooks()
    try:
        for name, fn in bwd_hooks:
            tl.add_hook(name, fn, dir="bwd")
        tl.add_caching_hooks(incl_bwd=True, cache=cache)  # what run_with_cache(incl_bwd) adds
        value = tl(tokens, return_type="loss") if objective is None else objective(tl(tokens))
        value.backward()
    finally:
        tl.reset_hooks()
        tl.zero_grad(set_to_none=True)
    return float(value.detach()), cache


def assert_grads_match(ours: Any, ref: dict[str, torch.Tensor]) -> None:
    grads = sorted(name for name in ref if name.endswith("_grad"))
    assert grads and set(grads) <= set(ours.keys())
    for name in grads:
        torch.testing.assert_close(ours[name], ref[name], atol=ATOL, rtol=0, msg=name)


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    last = logits[:, -1]
    return (last[rows, ANSWER] - last[rows, WRONG]).mean()


def last_logprob_sum(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 5].sum()


# Each declarative metric, with the same objective written in plain torch (TL's side).
DECLARATIVE: dict[str, tuple[metrics.Metric, Objective]] = {
    "logit_diff": (metrics.logit_diff(ANSWER, WRONG), logit_diff),
    "logit": (
        metrics.logit(ANSWER, pos=-2),
        lambda logits: logits[torch.arange(2), -2, ANSWER].mean(),
    ),
    "prob": (
        metrics.prob(ANSWER, reduce="sum"),
        lambda logits: logits[:, -1].softmax(-1)[torch.arange(2), ANSWER].sum(),
    ),
    "logprob": (
        metrics.logprob(ANSWER),
        lambda logits: logits[:, -1].log_softmax(-1)[torch.arange(2), ANSWER].mean(),
    ),
}


def test_incl_bwd_from_the_loss_matches_tl(server: Served) -> None:
    tokens = sample_tokens(server.tl, batch=2, pos=6, seed=3)
    loss, cache = server.model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    value, ref = tl_backward(server.tl, tokens, None)
    assert abs(float(loss) - value) < ATOL
    assert_grads_match(cache, ref)
    for name in cache:  # forward entries are the activations, as without incl_bwd
        if not name.endswith("_grad"):
            torch.testing.assert_close(cache[name], ref[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(DECLARATIVE))
def test_incl_bwd_from_each_declarative_metric_matches_tl(server: Served, kind: str) -> None:
    metric, objective = DECLARATIVE[kind]
    tokens = sample_tokens(server.tl, batch=2, pos=6, seed=4)
    _, cache = server.model.run_with_cache(tokens, incl_bwd=True, metric=metric)
    _, ref = tl_backward(server.tl, tokens, objective)
    assert_grads_match(cache, ref)


def test_incl_bwd_from_a_loss_metric_matches_tl(gpt2_server: Served) -> None:
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=6, seed=5)
    _, cache = gpt2_server.model.run_with_cache(tokens, incl_bwd=True, metric=metrics.loss())
    _, ref = tl_backward(gpt2_server.tl, tokens, None)
    assert_grads_match(cache, ref)


def test_incl_bwd_from_a_traced_python_metric_matches_tl(server: Served) -> None:
    tokens = sample_tokens(server.tl, batch=2, pos=5, seed=6)
    names = lambda name: "resid" in name or "hook_z" in name  # noqa: E731
    _, cache = server.model.run_with_cache(
        tokens, names_filter=names, incl_bwd=True, metric=last_logprob_sum
    )
    _, ref = tl_backward(server.tl, tokens, last_logprob_sum)
    wanted = {n for n in ref if names(n.removesuffix("_grad"))}
    assert set(cache.keys()) == wanted, "names_filter applies to activations and gradients"
    assert_grads_match(cache, {n: ref[n] for n in wanted})


def test_gradient_cache_works_with_analysis(gpt2_server: Served) -> None:
    """``cache.gradients()`` is a cache: its decomposition equals TL's on the same gradients."""
    from transformer_lens import ActivationCache as TLCache

    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=7)
    _, cache = gpt2_server.model.run_with_cache(tokens, incl_bwd=True, metric=last_logprob_sum)
    _, ref = tl_backward(gpt2_server.tl, tokens, last_logprob_sum)
    tl_grads = TLCache(
        {n.removesuffix("_grad"): v for n, v in ref.items() if n.endswith("_grad")},
        gpt2_server.tl,
    )
    ours = cache.gradients().accumulated_resid(apply_ln=False)
    torch.testing.assert_close(ours, tl_grads.accumulated_resid(apply_ln=False), atol=ATOL, rtol=0)


def scale_half(grad: torch.Tensor, hook: Any) -> torch.Tensor:
    return grad * 0.5


def zero_head_one(grad: torch.Tensor, hook: Any) -> torch.Tensor:
    grad = grad.clone()
    grad[:, :, 1] = 0.0
    return grad


def zero_everything(grad: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(grad)


@pytest.mark.parametrize(
    "ours, theirs, where",
    [
        (hooks.scale(0.5), scale_half, "blocks.1.hook_resid_pre"),
        (hooks.ablate(head=[1]), zero_head_one, "blocks.1.attn.hook_z"),
        (scale_half, scale_half, "blocks.0.hook_mlp_out"),  # traced
        (hooks.callback(zero_head_one), zero_head_one, "blocks.1.attn.hook_z"),
        (hooks.callback(zero_everything), zero_everything, "blocks.1.hook_attn_out"),
    ],
    ids=["spec-scale", "spec-zero-head", "traced", "callback", "callback-zero"],
)
def test_backward_hooks_change_upstream_gradients_as_in_tl(
    server: Served, ours: Any, theirs: Callable[..., Any], where: str
) -> None:
    model = server.model
    tokens = sample_tokens(server.tl, batch=2, pos=5, seed=8)
    model.add_hook(where, ours, dir="bwd")
    try:
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    finally:
        model.reset_hooks()
    _, ref = tl_backward(server.tl, tokens, None, [(where, theirs)])
    _, plain = tl_backward(server.tl, tokens, None)
    assert_grads_match(cache, ref)
    changed = [n for n in ref if n.endswith("_grad") and not torch.allclose(ref[n], plain[n])]
    assert changed, "the backward hook changed nothing upstream"


def test_run_with_hooks_with_bwd_hooks_and_a_metric(gpt2_server: Served) -> None:
    """run_with_hooks(bwd_hooks=..., metric=...): the backward runs in the call; a callback
    backward hook sees TL's gradients."""
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=5, seed=9)
    seen: dict[str, torch.Tensor] = {}

    def keep(grad: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = grad.clone()

    logits = gpt2_server.model.run_with_hooks(
        tokens,
        bwd_hooks=[("blocks.0.hook_resid_post", hooks.callback(keep))],
        metric=metrics.logit_diff(ANSWER, WRONG),
    )
    _, ref = tl_backward(gpt2_server.tl, tokens, logit_diff)
    torch.testing.assert_close(logits, gpt2_server.tl(tokens), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        seen["blocks.0.hook_resid_post"], ref["blocks.0.hook_resid_post_grad"], atol=ATOL, rtol=0
    )


def test_the_attribution_demo_pattern_runs_unchanged(gpt2_server: Served) -> None:
    """TransformerLens's Attribution Patching demo, ``get_cache_fwd_and_bwd``, verbatim: hooks
    that store into dicts, ``metric(model(tokens)).backward()``, ``value.item()``."""
    from hooklab import ActivationCache

    def get_cache_fwd_and_bwd(
        model: Any, tokens: torch.Tensor, metric: Objective
    ) -> tuple[float, Any, Any]:
        filter_not_qkv_input = lambda name: "_input" not in name  # noqa: E731
        model.reset_hooks()
        cache = {}

        def forward_cache_hook(act: torch.Tensor, hook: Any) -> None:
            cache[hook.name] = act.detach()

        model.add_hook(filter_not_qkv_input, forward_cache_hook, "fwd")
        grad_cache = {}

        def backward_cache_hook(act: torch.Tensor, hook: Any) -> None:
            grad_cache[hook.name] = act.detach()

        model.add_hook(filter_not_qkv_input, backward_cache_hook, "bwd")
        value = metric(model(tokens))
        value.backward()
        model.reset_hooks()
        return (
            value.item(),
            ActivationCache(cache, model),
            ActivationCache(grad_cache, model),
        )

    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=5, seed=10)
    value, cache, grads = get_cache_fwd_and_bwd(gpt2_server.model, tokens, logit_diff)
    ref_value, ref = tl_backward(gpt2_server.tl, tokens, logit_diff)
    assert abs(value - ref_value) < ATOL
    assert len(grads.cache_dict) > 10 and len(cache.cache_dict) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[f"{name}_grad"], atol=ATOL, rtol=0, msg=name)
    for name, act in cache.items():
        torch.testing.assert_close(act, ref[name], atol=ATOL, rtol=0, msg=name)


def test_a_lazy_loss_and_run_with_hooks_output_backpropagate_on_the_server(
    gpt2_server: Served,
) -> None:
    """With backward hooks added, ``model(tokens, return_type="loss").backward()`` and
    ``metric(model.run_with_hooks(..., bwd_hooks=...)).backward()`` run the backward there."""
    model, tl = gpt2_server.model, gpt2_server.tl
    tokens = sample_tokens(tl, batch=2, pos=5, seed=11)
    where = "blocks.0.hook_mlp_out"
    seen: dict[str, torch.Tensor] = {}

    def keep(grad: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = grad.clone()

    model.add_hook(where, hooks.callback(keep), dir="bwd")
    try:
        loss = model(tokens, return_type="loss")
        loss.backward()
    finally:
        model.reset_hooks()
    ref_loss, ref = tl_backward(tl, tokens, None)
    assert abs(loss.item() - ref_loss) < ATOL
    torch.testing.assert_close(seen.pop(where), ref[f"{where}_grad"], atol=ATOL, rtol=0)

    logits = model.run_with_hooks(tokens, bwd_hooks=[(where, hooks.callback(keep))])
    value = logit_diff(logits)
    value.backward()
    _, ref = tl_backward(tl, tokens, logit_diff)
    torch.testing.assert_close(seen.pop(where), ref[f"{where}_grad"], atol=ATOL, rtol=0)


def test_concurrent_users_gradients_equal_their_solo_runs(gpt2_server: Served) -> None:
    model = gpt2_server.model
    prompts = [sample_tokens(gpt2_server.tl, batch=2, pos=p, seed=20 + p) for p in (5, 7)]
    metric = metrics.logit_diff(ANSWER, WRONG)
    solo = [model.run_with_cache(t, incl_bwd=True, metric=metric)[1] for t in prompts]
    together: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            together[i] = model.run_with_cache(prompts[i], incl_bwd=True, metric=metric)[1]
        except BaseException as exc:  # reported below
            errors.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        for alone, mixed in zip(solo, together, strict=True):
            for name in alone:
                torch.testing.assert_close(mixed[name], alone[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"incl_bwd": True}, "starts from a scalar"),
        ({"incl_bwd": True, "return_type": "loss", "loss_per_token": True}, "per token"),
        ({"incl_bwd": True, "metric": metrics.loss(), "stop_at_layer": 1}, "stop_at_layer"),
    ],
    ids=["logits", "per-token", "stop-at-layer"],
)
def test_a_backward_without_a_scalar_is_refused_clearly(
    gpt2_server: Served, kwargs: dict[str, Any], words: str
) -> None:
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=4)
    with pytest.raises(ServerError, match=words) as caught:
        gpt2_server.model.run_with_cache(tokens, **kwargs)
    assert caught.value.status == 422


def test_an_untraceable_metric_cannot_start_a_backward(gpt2_server: Served) -> None:
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=4)

    def needs_values(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, int(logits[0, -1].argmax())]

    with pytest.raises(TypeError, match="cannot start a backward pass"):
        gpt2_server.model.run_with_cache(tokens, incl_bwd=True, metric=needs_values)


def test_backward_memory_is_counted_in_admission(make_server: Callable[..., Served]) -> None:
    """A backward keeps every layer's activations: a request that fits as a forward is refused
    (413, before it runs) once it asks for gradients, and the message says why."""
    served = make_server(memory_budget_bytes=8 * 2**20)
    tokens = sample_tokens(served.tl, batch=4, pos=64, seed=40)
    served.model(tokens, return_type="loss")  # the forward alone fits
    with pytest.raises(ServerError, match="backward pass keeps about") as caught:
        served.model.run_with_cache(
            tokens, names_filter="blocks.0.hook_resid_pre", return_type="loss", incl_bwd=True
        )
    assert caught.value.status == 413
    assert "memory_budget_bytes" in str(caught.value)


def test_backward_hooks_are_added_and_removed_as_in_tl(gpt2_server: Served) -> None:
    """``hooks(bwd_hooks=...)``, ``add_perma_hook(..., dir="bwd")``, ``reset_hooks`` and a hook
    point's ``remove_hooks(dir=...)`` keep and drop backward hooks as TransformerLens does."""
    model = gpt2_server.model
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=41)
    names = ["blocks.0.hook_resid_post"]
    cut = ("blocks.1.hook_resid_pre", hooks.scale(0.0))  # nothing flows below layer 1

    def upstream() -> torch.Tensor:
        _, cache = model.run_with_cache(
            tokens, names_filter=names, return_type="loss", incl_bwd=True
        )
        return cache["blocks.0.hook_resid_post_grad"]

    assert upstream().abs().max() > 0
    with model.hooks(bwd_hooks=[cut]):
        assert upstream().abs().max() == 0
    assert upstream().abs().max() > 0
    model.add_perma_hook(*cut, dir="bwd")
    model.reset_hooks()
    assert upstream().abs().max() == 0, "a permanent hook outlives reset_hooks()"
    model.reset_hooks(including_permanent=True)
    assert upstream().abs().max() > 0
    point = model.blocks[1].hook_resid_pre
    point.add_hook(hooks.scale(0.0), dir="bwd")
    point.remove_hooks(dir="fwd")
    assert upstream().abs().max() == 0, "removing forward hooks keeps backward ones"
    point.remove_hooks(dir="bwd")
    assert upstream().abs().max() > 0
    with pytest.raises(ValueError, match="dir"):
        model.add_hook("hook_embed", hooks.scale(1.0), dir="sideways")  # type: ignore[arg-type]


def test_an_in_place_edit_the_backward_needs_is_the_requests_error(gpt2_server: Served) -> None:
    """A hook editing in place a tensor autograd saved (the norm's scale, kept by its square
    root) cannot be differentiated, in TransformerLens either: a 422 that says so."""

    def double_in_place(scale: torch.Tensor, hook: Any) -> torch.Tensor:
        scale.mul_(2.0)
        return scale

    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5)
    with pytest.raises(ServerError, match="in-place edit") as caught:
        gpt2_server.model.run_with_cache(
            tokens, return_type="loss", incl_bwd=True,
            fwd_hooks=[("blocks.0.ln2.hook_scale", double_in_place)],
        )  # fmt: skip
    assert caught.value.status == 422
