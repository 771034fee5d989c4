"""Logits of run_with_hooks stay on the server until read, and only what is read comes back.

TransformerLens's own ``patching`` functions, given a hooklab model, run one forward per index
and read one number per forward: each reading sends the metric with the forward and receives
that number, and every value equals TransformerLens 3.9's run locally.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformer_lens import patching

from hooklab.lazy import LazyLogits

from .e2e_helpers import assert_close
from .e2e_servers import Served, sample_tokens


def test_tl_patching_module_on_a_hooklab_model(server: Served) -> None:
    clean = sample_tokens(server.tl, batch=1, pos=5, seed=21)
    corrupt = sample_tokens(server.tl, batch=1, pos=5, seed=22)
    answer, wrong = int(clean[0, -1]), int(corrupt[0, -1])

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    results = []
    for model in (server.tl, server.model):
        _, clean_cache = model.run_with_cache(clean)
        results.append(patching.get_act_patch_resid_pre(model, corrupt, clean_cache, logit_diff))
    assert_close(results[1], results[0], "resid_pre patching")


def test_lazy_logits_read_in_parts_and_whole(server: Served) -> None:
    tokens = sample_tokens(server.tl, seed=23)

    def scale(x: torch.Tensor, hook: Any, factor: float) -> torch.Tensor:
        return x * factor

    hooks = [("blocks.0.hook_resid_post", partial(scale, factor=0.5))]
    expected = server.tl.run_with_hooks(tokens, fwd_hooks=hooks).detach()
    lazy = server.model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert isinstance(lazy, LazyLogits) and lazy.shape == expected.shape
    last = lazy[:, -1].log_softmax(-1)
    assert_close(last.materialize(), expected[:, -1].log_softmax(-1), "log-probs at the end")
    top = lazy.argmax(-1)
    assert torch.equal(top.materialize(), expected.argmax(-1))
    assert abs(float(lazy[0, 0, 3]) - float(expected[0, 0, 3])) < 1e-4
    assert_close(torch.as_tensor(lazy.materialize()), expected, "all logits")
    assert torch.allclose(torch.softmax(lazy, -1), torch.softmax(expected, -1), atol=1e-5)
