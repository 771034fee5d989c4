"""Hook functions edit activations exactly as the same Python hook does in TransformerLens 3.9.

The hook contract is TL's: ``fn(activation, hook) -> Tensor | None`` with ``hook.name``. The TL
reference for "hooks + cache" is the usual idiom ``with model.hooks(fwd_hooks): run_with_cache``,
where the user hook runs before the caching hook, so the cache holds the edited value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    as_dict,
    assert_caches_close,
    assert_close,
    assert_same_keys,
    left_padded_batch,
    our_model,
    sample_tokens,
    tl_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


# ---- edits -------------------------------------------------------------------------------------


def zero_head_1(z: torch.Tensor, hook: Any) -> torch.Tensor:
    z[:, :, 1] = 0.0  # in place, and returned
    return z


def halve_in_place(x: torch.Tensor, hook: Any) -> None:
    x.mul_(0.5)  # in place, returns None


def scale(factor: float) -> HookFn:
    def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x * factor

    return fn


def add(value: float) -> HookFn:
    def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x + value

    return fn


def add_random_direction(seed: int, size: float) -> HookFn:
    def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return x + size * torch.randn(x.shape[-1], generator=generator).to(x.dtype)

    return fn


def pattern_head_2_to_first_token(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    pattern = pattern.clone()
    pattern[:, 2] = 0.0
    pattern[:, 2, :, 0] = 1.0
    return pattern


def boost_first_key(scores: torch.Tensor, hook: Any) -> torch.Tensor:
    scores = scores.clone()
    scores[..., 0] += 2.0  # key 0 is never masked by causality
    return scores


def flip_kv_head_0(x: torch.Tensor, hook: Any) -> torch.Tensor:
    x = x.clone()
    x[:, :, 0] = -x[:, :, 0]
    return x


def ablate_first_neurons(post: torch.Tensor, hook: Any) -> torch.Tensor:
    post[..., :32] = 0.0
    return post


def zero(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(x)


def copy_position_5_to_3(resid: torch.Tensor, hook: Any) -> torch.Tensor:
    resid = resid.clone()
    resid[:, 3] = resid[:, 5]
    return resid


EDITS: dict[str, tuple[str, HookFn]] = {
    "z_zero_head": ("blocks.0.attn.hook_z", zero_head_1),
    "resid_post_inplace_none": ("blocks.0.hook_resid_post", halve_in_place),
    "resid_post_scale": ("blocks.0.hook_resid_post", scale(0.5)),
    "resid_pre_patch_position": ("blocks.1.hook_resid_pre", copy_position_5_to_3),
    "pattern": ("blocks.1.attn.hook_pattern", pattern_head_2_to_first_token),
    "attn_scores": ("blocks.0.attn.hook_attn_scores", boost_first_key),
    "q": ("blocks.1.attn.hook_q", scale(1.5)),
    "k": ("blocks.0.attn.hook_k", flip_kv_head_0),
    "v": ("blocks.0.attn.hook_v", add(0.3)),
    "rot_q": ("blocks.0.attn.hook_rot_q", scale(-1.0)),
    "rot_k": ("blocks.1.attn.hook_rot_k", flip_kv_head_0),
    "attn_out": ("blocks.1.hook_attn_out", zero),
    "resid_mid": ("blocks.0.hook_resid_mid", scale(2.0)),
    "ln1_normalized": ("blocks.0.ln1.hook_normalized", scale(1.1)),
    "ln2_scale": ("blocks.1.ln2.hook_scale", scale(2.0)),
    "ln_final_scale": ("ln_final.hook_scale", scale(2.0)),
    "mlp_pre": ("blocks.1.mlp.hook_pre", scale(2.0)),
    "mlp_pre_linear": ("blocks.0.mlp.hook_pre_linear", scale(-1.0)),
    "mlp_post": ("blocks.0.mlp.hook_post", ablate_first_neurons),
    "mlp_out": ("blocks.0.hook_mlp_out", scale(3.0)),
    "embed": ("hook_embed", add_random_direction(0, 0.5)),
    "pos_embed": ("hook_pos_embed", zero),
    "unembed_in": ("unembed.hook_in", scale(0.5)),
    "unembed_out": ("unembed.hook_out", add(1.0)),
}


def _require(checkpoint: Path, *names: str) -> None:
    hook_dict = tl_model(checkpoint).hook_dict
    for name in names:
        if name not in hook_dict:
            pytest.skip(f"{name} is not a hook point of this architecture")


def _tl_run_with_cache(model: Any, tokens: torch.Tensor, hooks: list, **kwargs: Any) -> tuple:
    with model.hooks(fwd_hooks=hooks):
        return model.run_with_cache(tokens, return_cache_object=False, **kwargs)


@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_changes_downstream_like_tl(any_checkpoint: Path, edit: str) -> None:
    name, fn = EDITS[edit]
    _require(any_checkpoint, name)
    tokens = sample_tokens(any_checkpoint)
    ref_model = tl_model(any_checkpoint)
    clean_logits = ref_model(tokens)
    ref_logits, ref_cache = _tl_run_with_cache(ref_model, tokens, [(name, fn)])
    assert (ref_logits - clean_logits).abs().max() > 1e-3, "edit has no effect in TL"

    logits, cache = our_model(any_checkpoint).run_with_cache(tokens, fwd_hooks=[(name, fn)])
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache, skip=(name,))  # downstream (and upstream) activations
    assert_close(logits, ref_logits, "logits")

    # run_with_hooks and forward(fwd_hooks=…) give the same logits.
    ours = our_model(any_checkpoint)
    assert_close(ours.run_with_hooks(tokens, fwd_hooks=[(name, fn)]), ref_logits, "run_with_hooks")
    assert_close(ours(tokens, fwd_hooks=[(name, fn)]), ref_logits, "forward(fwd_hooks=…)")


@pytest.mark.parametrize("edit", ["z_zero_head", "resid_post_scale", "pattern", "mlp_post"])
def test_cache_holds_the_edited_value(any_checkpoint: Path, edit: str) -> None:
    """As with TL's ``with model.hooks(...): run_with_cache``: the hooked point caches the edit."""
    name, fn = EDITS[edit]
    tokens = sample_tokens(any_checkpoint)
    _, ref_cache = _tl_run_with_cache(tl_model(any_checkpoint), tokens, [(name, fn)])
    _, cache = our_model(any_checkpoint).run_with_cache(tokens, fwd_hooks=[(name, fn)])
    assert_close(as_dict(cache)[name], ref_cache[name], name)


def test_edit_on_unprocessed_model_matches_tl(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    hooks = [EDITS["z_zero_head"], EDITS["mlp_post"], EDITS["ln1_normalized"]]
    with tl_model(any_checkpoint, "unprocessed").hooks(fwd_hooks=hooks):
        expected = tl_model(any_checkpoint, "unprocessed")(tokens)
    actual = our_model(any_checkpoint, "unprocessed").run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(actual, expected, "logits")


def test_hooks_are_removed_after_the_run(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    ours = our_model(any_checkpoint)
    ours.run_with_hooks(tokens, fwd_hooks=[EDITS["resid_post_scale"]])
    ours.run_with_cache(tokens, fwd_hooks=[EDITS["pattern"]])
    ours(tokens, fwd_hooks=[EDITS["z_zero_head"]])
    assert_close(ours(tokens), tl_model(any_checkpoint)(tokens), "logits after hooked runs")


def test_several_hooks_on_one_point_run_in_order(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    name = "blocks.0.hook_resid_post"
    hooks = [(name, scale(2.0)), (name, add(1.0)), (name, scale(0.5))]
    with tl_model(any_checkpoint).hooks(fwd_hooks=hooks):
        expected = tl_model(any_checkpoint)(tokens)
    assert_close(our_model(any_checkpoint).run_with_hooks(tokens, fwd_hooks=hooks), expected,
                 "logits")  # fmt: skip


@pytest.mark.parametrize("return_type", ["loss", "both"])
def test_run_with_hooks_other_return_types(any_checkpoint: Path, return_type: str) -> None:
    tokens = sample_tokens(any_checkpoint)
    hooks = [EDITS["z_zero_head"]]
    expected = tl_model(any_checkpoint).run_with_hooks(
        tokens, fwd_hooks=hooks, return_type=return_type, loss_per_token=True
    )
    actual = our_model(any_checkpoint).run_with_hooks(
        tokens, fwd_hooks=hooks, return_type=return_type, loss_per_token=True
    )
    if return_type == "both":
        assert_close(actual[0], expected[0], "logits")
        assert_close(actual[1], expected[1], "per-token loss")
    else:
        assert_close(actual, expected, "per-token loss")


def test_hook_on_left_padded_batch(any_checkpoint: Path) -> None:
    tokens, mask, _ = left_padded_batch(any_checkpoint)
    hooks = [EDITS["z_zero_head"], EDITS["attn_scores"]]
    with tl_model(any_checkpoint).hooks(fwd_hooks=hooks):
        expected = tl_model(any_checkpoint)(tokens, attention_mask=mask)
    actual = our_model(any_checkpoint).run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)
    assert_caches_close({"logits": actual}, {"logits": expected}, attention_mask=mask)


# ---- conditional hooks, edited -----------------------------------------------------------------


COND_EDITS: dict[str, tuple[str, str, HookFn]] = {
    "result": ("set_use_attn_result", "blocks.0.attn.hook_result", zero_head_1),
    "q_input": ("set_use_split_qkv_input", "blocks.0.hook_q_input", zero_head_1),
    "k_input": ("set_use_split_qkv_input", "blocks.1.hook_k_input", flip_kv_head_0),
    "v_input": ("set_use_split_qkv_input", "blocks.0.hook_v_input", add_random_direction(1, 1.0)),
    "mlp_in": ("set_use_hook_mlp_in", "blocks.0.hook_mlp_in", add_random_direction(2, 1.0)),
    "attn_in": ("set_use_attn_in", "blocks.1.hook_attn_in", zero_head_1),
}


@pytest.mark.parametrize("edit", list(COND_EDITS))
def test_conditional_hook_edit_matches_tl(any_checkpoint: Path, edit: str) -> None:
    setter, name, fn = COND_EDITS[edit]
    ref_model = tl_model(any_checkpoint)
    if setter == "set_use_attn_in" and ref_model.cfg.n_key_value_heads not in (
        None,
        ref_model.cfg.n_heads,
    ):
        pytest.skip("TL's set_use_attn_in asserts multi-head attention (no GQA)")
    tokens = sample_tokens(any_checkpoint)
    getattr(ref_model, setter)(True)
    try:
        expected = ref_model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])
    finally:
        getattr(ref_model, setter)(False)
    assert (expected - ref_model(tokens)).abs().max() > 1e-3, "edit has no effect in TL"
    actual = our_model(any_checkpoint).run_with_hooks(tokens, fwd_hooks=[(name, fn)])
    assert_close(actual, expected, "logits")


# ---- SDPA vs explicit attention ----------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_pattern_hooks_and_captures_leave_the_logits_alone(
    any_checkpoint: Path, padded: bool
) -> None:
    """Capturing or read-only hooking of hook_pattern / hook_attn_scores vs nothing hooked:
    the same logits (capture_invariance tests the bits)."""
    if padded:
        tokens, mask, _ = left_padded_batch(any_checkpoint)
    else:
        tokens, mask = sample_tokens(any_checkpoint), None
    ours = our_model(any_checkpoint)
    plain = ours(tokens, attention_mask=mask)
    captured, _ = ours.run_with_cache(
        tokens, names_filter="blocks.0.attn.hook_pattern", attention_mask=mask
    )
    hooked = ours.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: None)],
        attention_mask=mask,
    )
    scores_hooked = ours.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda s, hook: s)],
        attention_mask=mask,
    )
    real = torch.ones_like(tokens) if mask is None else mask
    for what, logits in [("cached", captured), ("hooked", hooked), ("scores", scores_hooked)]:
        assert_caches_close({what: logits}, {what: plain}, atol=1e-5, attention_mask=real)
    # and all of them equal TL's
    expected = tl_model(any_checkpoint)(tokens, attention_mask=mask)
    assert_caches_close({"l": plain}, {"l": expected}, attention_mask=real)


# ---- names_filter forms, predicate hook names --------------------------------------------------


NAMES_FILTERS: dict[str, Any] = {
    "none": None,
    "str": "blocks.1.hook_resid_post",
    "list": [
        "hook_embed",
        "blocks.0.attn.hook_z",
        "blocks.1.attn.hook_pattern",
        "ln_final.hook_scale",
    ],
    "callable_pattern": lambda name: name.endswith("hook_pattern"),
    "callable_layer_1": lambda name: name.startswith("blocks.1."),
    "callable_none": lambda name: False,
    "empty_list": [],
}


@pytest.mark.parametrize("form", list(NAMES_FILTERS))
def test_names_filter_forms_match_tl(any_checkpoint: Path, form: str) -> None:
    names_filter = NAMES_FILTERS[form]
    tokens = sample_tokens(any_checkpoint)
    ref_logits, ref_cache = tl_model(any_checkpoint).run_with_cache(
        tokens, names_filter=names_filter, return_cache_object=False
    )
    logits, cache = our_model(any_checkpoint).run_with_cache(tokens, names_filter=names_filter)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")


def _recording(calls: list[str], inner: HookFn) -> HookFn:
    def fn(x: torch.Tensor, hook: Any) -> torch.Tensor | None:
        calls.append(hook.name)
        return inner(x, hook)

    return fn


@pytest.mark.parametrize(
    "predicate",
    [
        lambda name: name.endswith("attn.hook_z"),
        lambda name: name.endswith("hook_resid_post"),
        lambda name: name.endswith("mlp.hook_post"),
    ],
    ids=["hook_z", "resid_post", "mlp_post"],
)
def test_predicate_hook_names(any_checkpoint: Path, predicate: Callable[[str], bool]) -> None:
    """A predicate hooks every matching point; hook.name is each point's name, in firing order."""
    tokens = sample_tokens(any_checkpoint)
    ref_calls: list[str] = []
    calls: list[str] = []
    expected = tl_model(any_checkpoint).run_with_hooks(
        tokens, fwd_hooks=[(predicate, _recording(ref_calls, scale(0.7)))]
    )
    actual = our_model(any_checkpoint).run_with_hooks(
        tokens, fwd_hooks=[(predicate, _recording(calls, scale(0.7)))]
    )
    assert calls == ref_calls
    assert_close(actual, expected, "logits")


def test_hook_receives_tl_shapes(any_checkpoint: Path) -> None:
    """A hook on every (non-conditional) point sees TL's shape at that point."""
    tokens = sample_tokens(any_checkpoint)
    ref_shapes: dict[str, tuple[int, ...]] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(store: dict[str, tuple[int, ...]]) -> HookFn:
        def fn(x: torch.Tensor, hook: Any) -> None:
            store[hook.name] = tuple(x.shape)

        return fn

    ref_model = tl_model(any_checkpoint)
    ref_model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, record(ref_shapes))])
    ours = our_model(any_checkpoint)
    ours.run_with_hooks(tokens, fwd_hooks=[(name, record(shapes)) for name in ref_shapes])
    assert shapes == ref_shapes
