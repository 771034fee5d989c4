"""The engine's fast paths (issue 18) keep TransformerLens's numbers and hook semantics.

* Fused projections: q/k/v (and gate/up in a gated MLP) through one matmul give the activations
  of the unfused projections at every hook point (within 1e-5), and both are TransformerLens's.
  The unfused parameters stay the weights: an in-place edit of one reaches the fused product,
  and so does a replaced parameter.
* Generation's prefill multiplies the unembedding for the last position only: its logits are
  a full forward's last position, and ``unembed.hook_out`` still sees every position.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    as_dict,
    assert_caches_close,
    left_padded_batch,
    our_model,
    sample_tokens,
    tl_model,
)
from torch import nn

from hooklab_server.engine.components.attention import Attention
from hooklab_server.engine.components.mlp import MLP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUSED_ATOL = 1e-5


def full_cache(model: Any, tokens: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    return {"logits": logits, **as_dict(cache)}


def assert_within(actual: dict[str, Any], expected: dict[str, Any], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        diff = (actual[name].double() - value.double()).nan_to_num(0.0).abs().max()
        assert float(diff) <= atol, f"{name}: fused vs unfused differ by {float(diff):.3g}"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_fused_equals_unfused_at_every_hook_point(
    any_checkpoint: Path, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if padded:
        tokens, mask, _ = left_padded_batch(any_checkpoint)
    else:
        tokens, mask = sample_tokens(any_checkpoint), None
    model = our_model(any_checkpoint)
    fused = full_cache(model, tokens, mask)
    with monkeypatch.context() as patch:
        patch.setattr(Attention, "fuse", False)
        patch.setattr(MLP, "fuse", False)
        unfused = full_cache(model, tokens, mask)
    assert_within(fused, unfused, FUSED_ATOL)
    # and both are TransformerLens's numbers
    ref_logits, ref_cache = tl_model(any_checkpoint).run_with_cache(
        tokens, attention_mask=mask, return_cache_object=False
    )
    real = torch.ones_like(tokens) if mask is None else mask
    logits = fused.pop("logits")
    assert_caches_close(fused, ref_cache, attention_mask=real)
    assert_caches_close({"logits": logits}, {"logits": ref_logits}, attention_mask=real)


def test_fused_weights_are_views_of_the_unfused_ones(any_checkpoint: Path) -> None:
    model = our_model(any_checkpoint)
    attn = model.blocks[0].attn
    weight = attn._qkv_weight((attn.w_q, attn.w_k, attn.w_v))
    assert weight.untyped_storage().data_ptr() == attn.w_q.untyped_storage().data_ptr()
    assert torch.equal(weight, torch.cat((attn.w_q, attn.w_k, attn.w_v)))
    mlp = model.blocks[0].mlp
    if mlp.w_gate is not None:
        gate_up = mlp._gate_up((mlp.w_gate, mlp.w_in))
        assert gate_up.untyped_storage().data_ptr() == mlp.w_gate.untyped_storage().data_ptr()


def test_edited_and_replaced_weights_reach_the_fused_product(
    any_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy.deepcopy(our_model(any_checkpoint))
    tokens = sample_tokens(any_checkpoint)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        attn.w_k.mul_(1.5)  # in place, in the shared buffer
        # replaced: no longer rows of one buffer, so the fused weight is a concatenation
        attn.w_v = nn.Parameter(attn.w_v.detach() * 0.5, requires_grad=False)
        if mlp.w_gate is not None:
            mlp.w_in = nn.Parameter(mlp.w_in.detach() * 2.0, requires_grad=False)
    before = full_cache(model, tokens, None)
    with torch.no_grad():
        attn.w_v.mul_(2.0)  # in place on the replaced one: the concatenation is made again
    after = full_cache(model, tokens, None)
    with monkeypatch.context() as patch:
        patch.setattr(Attention, "fuse", False)
        patch.setattr(MLP, "fuse", False)
        unfused = full_cache(model, tokens, None)
    assert_within(after, unfused, FUSED_ATOL)
    assert not torch.allclose(before["blocks.0.attn.hook_v"], after["blocks.0.attn.hook_v"])


def test_last_logits_are_a_full_forwards_last_position(any_checkpoint: Path) -> None:
    tokens, mask, _ = left_padded_batch(any_checkpoint)
    model = our_model(any_checkpoint)
    full = model(tokens, attention_mask=mask)
    seen: list[torch.Tensor] = []
    hooks = model.hook_run([("unembed.hook_out", lambda x, hook: seen.append(x.clone()))])
    last = model.last_logits(tokens, attention_mask=mask, hooks=hooks)
    assert last.shape == full[:, -1].shape
    assert torch.allclose(last, full[:, -1], atol=FUSED_ATOL, rtol=0)
    assert seen and seen[0].shape == full.shape  # the hook sees every position
    assert torch.allclose(seen[0], full, atol=FUSED_ATOL, rtol=0)


def test_preallocated_cache_is_written_in_place_and_matches_a_full_forward(
    any_checkpoint: Path,
) -> None:
    model = our_model(any_checkpoint)
    tokens = sample_tokens(any_checkpoint, batch=2, length=12)
    prompt, rest = tokens[:, :8], tokens[:, 8:]
    cache = model.init_kv_cache(reserve=tokens.shape[1])
    steps = [model(prompt, past_kv_cache=cache)[:, -1]]
    rooms = set()
    for i in range(rest.shape[1]):
        steps.append(model(rest[:, i : i + 1], past_kv_cache=cache)[:, -1])
        store = cache.layers[0]._store
        rooms.add(store.keys.untyped_storage().data_ptr())
        assert store.keys.shape[1] == tokens.shape[1]  # the reserved room, made once
    assert len(rooms) == 1
    assert cache.length == tokens.shape[1]
    full = model(tokens)
    for i, logits in enumerate(steps):
        assert torch.allclose(logits, full[:, 7 + i], atol=FUSED_ATOL, rtol=0)


def test_extending_an_older_cache_leaves_the_newer_one_alone(any_checkpoint: Path) -> None:
    model = our_model(any_checkpoint)
    tokens = sample_tokens(any_checkpoint, batch=1, length=10)
    cache = model.init_kv_cache(reserve=16)
    model(tokens[:, :8], past_kv_cache=cache)
    model(tokens[:, 8:9], past_kv_cache=cache)
    branch_point = copy.copy(cache)
    branch_point.layers = list(cache.layers)
    model(tokens[:, 9:10], past_kv_cache=cache)  # writes in place after position 9
    kept = [layer.keys.clone() for layer in cache.layers]
    other = tokens[:, 9:10].flip(0) + 1
    model(other, past_kv_cache=branch_point)  # an older cache: copies to new room first
    for layer, keys in zip(cache.layers, kept, strict=True):
        assert torch.equal(layer.keys, keys)


def test_generation_with_the_preallocated_cache_is_the_uncached_one(any_checkpoint: Path) -> None:
    model = our_model(any_checkpoint)
    tokens, mask, _ = left_padded_batch(any_checkpoint)
    args: dict[str, Any] = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False)
    cached = model.generate(tokens, attention_mask=mask, **args)
    uncached = model.generate(tokens, attention_mask=mask, use_past_kv_cache=False, **args)
    assert torch.equal(cached, uncached)
