"""Attribution patching (``hooklab.patching.get_attr_patch_*``) against TransformerLens 3.9
computed the way its Attribution Patching demo does: a clean cache, the corrupted run's forward
and gradient caches through hooks and ``metric(logits).backward()``, then per index row the
sum of ``grad * (clean - corrupted)`` over the slice that row patches — the slice cut by
TransformerLens's own patch setter — plus the corrupted metric."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens.utilities import get_act_name

from hooklab import metrics, patching

from .e2e_servers import Served, sample_tokens
from .test_gradients import ANSWER, WRONG, logit_diff, tl_backward
from .test_patching import FUNCTIONS as PATCHING_FUNCTIONS

ATOL = 1e-4
# Every get_act_patch_* sweep of one activation (the *_every ones stack several of them).
FUNCTIONS = [name for name in PATCHING_FUNCTIONS if not name.endswith("_every")]


class Setup:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.clean = sample_tokens(served.tl, batch=2, pos=5, seed=1)
        self.corrupted = sample_tokens(served.tl, batch=2, pos=5, seed=2)
        _, self.tl_clean = served.tl.run_with_cache(self.clean)
        _, self.cache = served.model.run_with_cache(self.clean, store=True)
        self.value, self.tl_corrupted = tl_backward(served.tl, self.corrupted, logit_diff)

    def reference(self, name: str) -> torch.Tensor:
        """TransformerLens's demo computation for the sweep of ``get_act_patch_*`` ``name``."""
        sweep = getattr(tl_patching, name).keywords
        setter, activation = sweep["patch_setter"], sweep["activation_name"]
        cfg, pos = self.served.tl.cfg, self.corrupted.shape[-1]
        heads = cfg.n_heads
        if activation in ("k", "v") and cfg.n_key_value_heads:
            heads = cfg.n_key_value_heads
        sizes = {"layer": cfg.n_layers, "pos": pos, "dest_pos": pos, "src_pos": pos}
        sizes |= {"head": heads, "head_index": heads}
        ranges = [sizes[axis] for axis in sweep["index_axis_names"]]
        result = torch.zeros(ranges)
        for index in itertools.product(*(range(size) for size in ranges)):
            hook = get_act_name(activation, index[0])
            corrupted = self.tl_corrupted[hook]
            change = self.tl_corrupted[f"{hook}_grad"] * (self.tl_clean[hook] - corrupted)
            picked = setter(torch.zeros_like(change), list(index), change)
            result[index] = self.value + picked.sum()
        return result


_setups: dict[str, Setup] = {}


def setup_for(served: Served) -> Setup:
    if served.url not in _setups:
        _setups[served.url] = Setup(served)
    return _setups[served.url]


def attr_name(name: str) -> str:
    return name.replace("get_act_patch", "get_attr_patch")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_attribution_matches_the_tl_demo(server: Served, name: str) -> None:
    setup = setup_for(server)
    activation = getattr(tl_patching, name).keywords["activation_name"]
    if get_act_name(activation, 0) not in server.tl.hook_dict:
        pytest.skip(f"{activation} is not a hook point of this architecture")
    function = getattr(patching, attr_name(name))
    ours = function(
        setup.served.model, setup.corrupted, setup.cache, metrics.logit_diff(ANSWER, WRONG)
    )
    expected = setup.reference(name)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name", ["get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_pattern_by_pos"]
)
def test_attribution_with_a_traced_metric_and_grouped_query_heads(
    llama_server: Served, name: str
) -> None:
    """A Python metric (traced, so the server's backward starts from it) and a client-side
    clean cache (uploaded), on Llama with 2 key-value heads for 4 query heads."""
    setup = setup_for(llama_server)
    function = getattr(patching, attr_name(name))
    ours = function(setup.served.model, setup.corrupted, setup.tl_clean, logit_diff)
    torch.testing.assert_close(ours, setup.reference(name), atol=ATOL, rtol=0)


def test_every_function_returns_activation_patching_shapes(llama_server: Served) -> None:
    setup = setup_for(llama_server)
    args = (setup.served.model, setup.corrupted, setup.cache, metrics.logit_diff(ANSWER, WRONG))
    for every in ("attn_head_all_pos_every", "attn_head_by_pos_every", "block_every"):
        attributed = getattr(patching, f"get_attr_patch_{every}")(*args)
        patched = getattr(patching, f"get_act_patch_{every}")(*args)
        assert attributed.shape == patched.shape, every


def test_normalized_attribution_is_the_change_over_the_clean_gap(gpt2_server: Served) -> None:
    """A normalized metric: 0 at the corrupted run, 1 at the clean one, as the IOI notebooks."""
    setup = setup_for(gpt2_server)
    model = setup.served.model
    clean_value = float(logit_diff(setup.served.tl(setup.clean)).detach())
    raw = patching.get_attr_patch_resid_pre(
        model, setup.corrupted, setup.cache, metrics.logit_diff(ANSWER, WRONG)
    )
    normalized = patching.get_attr_patch_resid_pre(
        model, setup.corrupted, setup.cache, metrics.logit_diff(ANSWER, WRONG, normalize=True)
    )
    expected = (raw - setup.value) / (clean_value - setup.value)
    torch.testing.assert_close(normalized, expected, atol=ATOL, rtol=0)


def test_attribution_ranks_like_activation_patching(gpt2_server: Served) -> None:
    """Two prompts one token apart (small changes, where patching is close to linear): over
    every layer and position the estimate has activation patching's signs where the effect is
    not negligible, and ranks the cells the same way (rank correlation)."""
    setup = setup_for(gpt2_server)
    model = setup.served.model
    corrupted = setup.clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % model.cfg.d_vocab
    _, clean_cache = model.run_with_cache(setup.clean, store=True)
    metric = metrics.logit_diff(ANSWER, WRONG)
    base = float(metric(model(corrupted)))
    attributed = patching.get_attr_patch_resid_pre(model, corrupted, clean_cache, metric) - base
    patched = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric) - base
    big = patched.abs() > 1e-3
    assert big.sum() >= 4
    assert torch.equal(attributed[big].sign(), patched[big].sign())
    ranks = [values[big].argsort().argsort().float() for values in (attributed, patched)]
    assert torch.corrcoef(torch.stack(ranks))[0, 1] > 0.8


def test_a_logits_metric_cannot_be_attributed(gpt2_server: Served) -> None:
    from hooklab.errors import ServerError

    setup = setup_for(gpt2_server)
    body: dict[str, Any] = {
        "corrupted": setup.corrupted, "clean_cache": setup.cache.cache_id,
        "activation": "resid_pre", "axes": ["layer", "pos"], "method": "attribution",
        "metric": {"kind": "logits"},
    }  # fmt: skip
    with pytest.raises(ServerError, match="differentiates the metric") as caught:
        setup.served.model._transport.frames("POST", "/v1/patching", body)
    assert caught.value.status == 422
