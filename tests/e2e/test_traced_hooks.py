"""Python hook functions, as TransformerLens users write them, run by a hooklab server.

Each case hands the *same* function to TransformerLens 3.9 (run locally on the same weights)
and to the hooklab client; hooklab traces it into a graph that the server runs inside its
forward. The results must agree within 1e-4, and no case may fall back to a callback.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

from hooklab.errors import ServerError
from hooklab.function_hooks import HooklabHookNotice

from .e2e_helpers import assert_close
from .e2e_servers import Served, sample_tokens


@pytest.fixture(autouse=True)
def traced_only(server: Served) -> Iterator[None]:
    """Every function here must trace: a fallback notice fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", HooklabHookNotice)
        yield


def _both(served: Served, tokens: torch.Tensor, hooks: list[tuple[Any, Any]]) -> None:
    expected = served.tl.run_with_hooks(tokens, fwd_hooks=hooks)
    actual = served.model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(actual, expected, "logits")


def test_patch_by_partial_over_a_clean_cache(server: Served) -> None:
    clean, corrupt = sample_tokens(server.tl, seed=1), sample_tokens(server.tl, seed=2)
    _, clean_cache = server.tl.run_with_cache(clean)

    def patch_residual(resid: torch.Tensor, hook: Any, position: int) -> torch.Tensor:
        resid[:, position, :] = clean_cache[hook.name][:, position, :]
        return resid

    for layer, position in ((0, 3), (1, -1)):
        name = f"blocks.{layer}.hook_resid_pre"
        _both(server, corrupt, [(name, partial(patch_residual, position=position))])


def test_patch_head_vectors_and_pattern(server: Served) -> None:
    clean, corrupt = sample_tokens(server.tl, seed=3), sample_tokens(server.tl, seed=4)
    _, clean_cache = server.tl.run_with_cache(clean)

    def patch_head(z: torch.Tensor, hook: Any, head: int) -> torch.Tensor:
        z[:, :, head, :] = clean_cache[hook.name][:, :, head, :]
        return z

    def patch_pattern(pattern: torch.Tensor, hook: Any, head: int) -> torch.Tensor:
        pattern[:, head, :, :] = clean_cache[hook.name][:, head, :, :]
        return pattern

    _both(server, corrupt, [("blocks.1.attn.hook_z", partial(patch_head, head=1))])
    _both(server, corrupt, [("blocks.0.attn.hook_v", partial(patch_head, head=0))])
    _both(server, corrupt, [("blocks.1.attn.hook_pattern", partial(patch_pattern, head=1))])


def test_in_place_ablation_returning_none_and_a_predicate(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=5)

    def zero_last_position_head(z: torch.Tensor, hook: Any) -> None:
        z[:, -1, 0, :] = 0.0

    def mean_ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act.mean(dim=0, keepdim=True).expand_as(act).clone()

    _both(server, tokens, [("blocks.0.attn.hook_z", zero_last_position_head)])
    _both(server, tokens, [(lambda name: name.endswith("mlp_out"), mean_ablate)])


def test_steering_and_projection_by_closures(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=6)
    d_model = server.tl.cfg.d_model
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    unit = direction / direction.norm()

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + 3.0 * direction

    def project_out(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid - (resid @ unit)[..., None] * unit

    def scale_where(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        norms = resid.norm(dim=-1, keepdim=True)
        return torch.where(norms > norms.mean(), resid * 0.5, resid)

    _both(server, tokens, [("blocks.0.hook_resid_post", steer)])
    _both(server, tokens, [("blocks.1.hook_resid_pre", project_out)])
    _both(server, tokens, [("blocks.0.hook_resid_post", scale_where)])


def test_add_hook_hooks_context_and_run_with_cache(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=7)

    def double(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act * 2

    name = "blocks.0.hook_mlp_out"
    try:
        server.tl.add_hook(name, double)
        server.model.add_hook(name, double)
        expected, expected_cache = server.tl.run_with_cache(tokens, names_filter=[name])
        actual, actual_cache = server.model.run_with_cache(tokens, names_filter=[name])
    finally:
        server.tl.reset_hooks()
        server.model.reset_hooks()
    assert_close(actual, expected, "logits under add_hook")
    assert_close(actual_cache[name], expected_cache[name], "cached hooked activation")
    with server.tl.hooks(fwd_hooks=[(name, double)]):
        expected = server.tl(tokens)
    with server.model.hooks(fwd_hooks=[(name, double)]):
        actual = server.model(tokens)
    assert_close(actual, expected, "logits under hooks()")
    assert_close(server.model(tokens), server.tl(tokens), "logits after the block")


def test_generate_with_a_steering_function(server: Served) -> None:
    d_model = server.tl.cfg.d_model
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(1)) * 4

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + vector

    def attend_first(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        return pattern * 0.5

    tokens = sample_tokens(server.tl, batch=1, pos=5, seed=8)
    for name, fn in (
        ("blocks.0.hook_resid_post", steer),
        ("blocks.1.attn.hook_pattern", attend_first),
    ):
        hooks = [(name, fn)]
        with server.tl.hooks(fwd_hooks=hooks):
            expected = server.tl.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
        actual = server.model.generate(
            tokens, max_new_tokens=6, do_sample=False, verbose=False, fwd_hooks=hooks
        )
        assert torch.equal(actual, expected), name


def test_indices_computed_in_the_function(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=9)

    def zero_largest_feature(x: torch.Tensor, hook: Any) -> None:
        top = x.abs().argmax(-1)
        rows = torch.arange(x.shape[0])[:, None]
        positions = torch.arange(x.shape[1])[None, :]
        x[rows, positions, top] = 0.0

    _both(server, tokens, [("blocks.0.hook_mlp_out", zero_largest_feature)])


def test_a_computed_index_out_of_range_fails_only_its_request(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=10)

    def past_the_end(x: torch.Tensor, hook: Any) -> torch.Tensor:
        beyond = x.abs().argmax(-1)[0, :1] + x.shape[-1]
        return x * x[:, :, beyond]

    logits = server.model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_mlp_out", past_the_end)]
    )
    with pytest.raises(ServerError, match="outside") as raised:
        logits.tolist()  # the forward runs when the logits are first read
    assert raised.value.status == 422
    assert_close(server.model(tokens), server.tl(tokens), "logits afterwards")
