"""Generation equals Hugging Face's and TransformerLens 3.9's, with and without the KV cache.

Prompts are token tensors (BOS + text tokens), so no ``prepend_bos`` question arises; EOS
stopping is switched off (``stop_at_eos=False`` here, ``eos_token_id=None`` for HF) except where
it is the subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    TEXTS,
    hf_model,
    left_padded_batch,
    our_model,
    prompt_ids,
    sample_tokens,
    tl_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = 10


def _ours_greedy(checkpoint: Path, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("stop_at_eos", False)
    kwargs.setdefault("do_sample", False)
    out = our_model(checkpoint).generate(tokens, max_new_tokens=NEW, **kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def _tl_greedy(checkpoint: Path, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("stop_at_eos", False)
    kwargs.setdefault("do_sample", False)
    return tl_model(checkpoint).generate(tokens, max_new_tokens=NEW, verbose=False, **kwargs)


def _hf_greedy(
    checkpoint: Path, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    model = hf_model(checkpoint)
    with torch.no_grad():
        return model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens) if mask is None else mask,
            max_new_tokens=NEW,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,  # never stop early
            pad_token_id=model.config.eos_token_id,
        )


def _assert_tokens_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert torch.equal(actual.cpu(), expected.cpu()), (
        f"{what}:\n  ours     {actual.tolist()}\n  expected {expected.tolist()}"
    )


def test_greedy_matches_hf(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    _assert_tokens_equal(
        _ours_greedy(any_checkpoint, tokens), _hf_greedy(any_checkpoint, tokens), "vs HF"
    )


def test_greedy_matches_tl(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    _assert_tokens_equal(
        _ours_greedy(any_checkpoint, tokens), _tl_greedy(any_checkpoint, tokens), "vs TL"
    )


def test_greedy_unprocessed_matches_hf(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint, batch=1, length=8)
    out = our_model(any_checkpoint, "unprocessed").generate(
        tokens, max_new_tokens=NEW, do_sample=False, stop_at_eos=False
    )
    _assert_tokens_equal(out, _hf_greedy(any_checkpoint, tokens), "unprocessed vs HF")


@pytest.mark.parametrize("use_past_kv_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_kv_cache_and_no_cache_match_tl(any_checkpoint: Path, use_past_kv_cache: bool) -> None:
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    expected = _tl_greedy(any_checkpoint, tokens)  # TL: cached == uncached (verified there)
    actual = _ours_greedy(any_checkpoint, tokens, use_past_kv_cache=use_past_kv_cache)
    _assert_tokens_equal(actual, expected, f"use_past_kv_cache={use_past_kv_cache}")


def test_kv_cache_equals_no_cache(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    _assert_tokens_equal(
        _ours_greedy(any_checkpoint, tokens, use_past_kv_cache=True),
        _ours_greedy(any_checkpoint, tokens, use_past_kv_cache=False),
        "KV cache vs no cache",
    )


@pytest.mark.parametrize("use_past_kv_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_left_padded_batch_equals_unbatched(any_checkpoint: Path, use_past_kv_cache: bool) -> None:
    """Prompts of different lengths, left-padded + mask: each row continues as it does alone."""
    tokens, mask, rows = left_padded_batch(any_checkpoint, lengths=(12, 7))
    batched = _ours_greedy(
        any_checkpoint, tokens, attention_mask=mask, use_past_kv_cache=use_past_kv_cache
    )
    assert batched.shape == (2, tokens.shape[1] + NEW)
    assert torch.equal(batched[:, : tokens.shape[1]], tokens), "the prompt is returned unchanged"
    hf_batched = _hf_greedy(any_checkpoint, tokens, mask)
    for i, row in enumerate(rows):
        single = torch.tensor([row])
        alone = _ours_greedy(any_checkpoint, single, use_past_kv_cache=use_past_kv_cache)
        _assert_tokens_equal(batched[i, tokens.shape[1] :], alone[0, len(row) :], f"row {i}")
        _assert_tokens_equal(
            batched[i, tokens.shape[1] :], _hf_greedy(any_checkpoint, single)[0, len(row) :],
            f"row {i} vs HF unbatched",
        )  # fmt: skip
    _assert_tokens_equal(batched, hf_batched, "vs HF left-padded batch")


def test_stop_at_eos_matches_tl(any_checkpoint: Path) -> None:
    """A stop token that one row produces early: TL stops that row and pads it with the eos id."""
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    free = _tl_greedy(any_checkpoint, tokens)
    eos = int(free[0, tokens.shape[1] + 2])  # row 0 emits it at step 2 (or earlier)
    expected = _tl_greedy(any_checkpoint, tokens, stop_at_eos=True, eos_token_id=eos)
    actual = _ours_greedy(any_checkpoint, tokens, stop_at_eos=True, eos_token_id=eos)
    _assert_tokens_equal(actual, expected, f"stop_at_eos with eos_token_id={eos}")


def test_stop_at_eos_list_matches_tl(any_checkpoint: Path) -> None:
    """A list of stop ids: rows stop on any; TL pads finished rows with the *tokenizer's* eos."""
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    free = _tl_greedy(any_checkpoint, tokens)
    eos = int(free[0, tokens.shape[1] + 2])
    other = int(free[1, tokens.shape[1] + 1])
    expected = _tl_greedy(any_checkpoint, tokens, stop_at_eos=True, eos_token_id=[eos, other])
    actual = _ours_greedy(any_checkpoint, tokens, stop_at_eos=True, eos_token_id=[eos, other])
    _assert_tokens_equal(actual, expected, f"stop_at_eos with eos_token_id={[eos, other]}")


def test_left_padded_batch_matches_tl_batched_strings(any_checkpoint: Path) -> None:
    """TL 3.9 ``generate(list[str])`` left-pads and masks; the same tokens + mask here agree."""
    ref = tl_model(any_checkpoint)
    prompts = [TEXTS[0][:40], TEXTS[3]]
    tokens = ref.to_tokens(prompts, padding_side="left")
    pad = ref.tokenizer.pad_token_id
    mask = (tokens.ne(pad).long().cumsum(-1) > 0).long()  # leading pads only
    expected = ref.generate(
        prompts, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False,
        return_type="tokens",
    )  # fmt: skip
    assert torch.equal(expected[:, : tokens.shape[1]], tokens)
    actual = _ours_greedy(any_checkpoint, tokens, attention_mask=mask)
    _assert_tokens_equal(actual, expected, "vs TL generate(list[str])")


def test_hook_calls_during_cached_generation_match_tl(any_checkpoint: Path) -> None:
    """With the KV cache, hooks see TL's per-step shapes (new positions only; rot_k with prefix)."""
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    suffixes = ("attn.hook_pattern", "attn.hook_k", "attn.hook_rot_k", "hook_resid_post", "hook_z")

    def recorder(calls: list) -> Any:
        def fn(x: torch.Tensor, hook: Any) -> None:
            calls.append((hook.name, tuple(x.shape)))

        return fn

    ref_calls: list = []
    calls: list = []
    with tl_model(any_checkpoint).hooks(
        fwd_hooks=[(lambda n: n.endswith(suffixes), recorder(ref_calls))]
    ):
        _tl_greedy(any_checkpoint, tokens)
    names = sorted({name for name, _ in ref_calls})
    _ours_greedy(any_checkpoint, tokens, fwd_hooks=[(name, recorder(calls)) for name in names])
    assert calls == ref_calls


def test_deterministic_sampling_settings_match_tl(any_checkpoint: Path) -> None:
    """Sampling with top_k=1 (with and without freq_penalty) is argmax: equal to TL's."""
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    for kwargs in (
        {"do_sample": True, "top_k": 1},
        {"do_sample": True, "top_k": 1, "freq_penalty": 2.0},
        {"do_sample": True, "top_k": 1, "temperature": 0.5},
        {"do_sample": True, "top_p": 1e-6},
        {"do_sample": True, "temperature": 0.0},
    ):
        _assert_tokens_equal(
            _ours_greedy(any_checkpoint, tokens, **kwargs),
            _tl_greedy(any_checkpoint, tokens, **kwargs),
            str(kwargs),
        )


def _steering_vector(checkpoint: Path) -> torch.Tensor:
    d_model = tl_model(checkpoint).cfg.d_model
    return 4.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("use_past_kv_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_steering_hook_during_generation_matches_tl(
    any_checkpoint: Path, use_past_kv_cache: bool
) -> None:
    vector = _steering_vector(any_checkpoint)

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + vector.to(resid.dtype)

    hooks = [("blocks.0.hook_resid_post", steer)]
    tokens = sample_tokens(any_checkpoint, batch=2, length=8)
    with tl_model(any_checkpoint).hooks(fwd_hooks=hooks):
        expected = _tl_greedy(any_checkpoint, tokens, use_past_kv_cache=use_past_kv_cache)
    assert not torch.equal(expected, _tl_greedy(any_checkpoint, tokens)), "steering has no effect"
    actual = _ours_greedy(
        any_checkpoint, tokens, fwd_hooks=hooks, use_past_kv_cache=use_past_kv_cache
    )
    _assert_tokens_equal(actual, expected, "steered generation")
    # The hook is gone afterwards.
    _assert_tokens_equal(
        _ours_greedy(any_checkpoint, tokens), _tl_greedy(any_checkpoint, tokens), "after steering"
    )


def test_head_ablation_during_generation_matches_tl(any_checkpoint: Path) -> None:
    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    hooks = [(f"blocks.{layer}.attn.hook_z", ablate) for layer in range(2)]
    tokens = torch.tensor([prompt_ids(any_checkpoint, 1, 9)])
    with tl_model(any_checkpoint).hooks(fwd_hooks=hooks):
        expected = _tl_greedy(any_checkpoint, tokens)
    _assert_tokens_equal(_ours_greedy(any_checkpoint, tokens, fwd_hooks=hooks), expected,
                         "ablated generation")  # fmt: skip


@pytest.mark.parametrize(
    "prompt",
    ["def f(x):", [TEXTS[0][:40], TEXTS[3]], [TEXTS[3]]],
    ids=["str", "list_of_two", "list_of_one"],
)
@pytest.mark.parametrize("return_type", ["input", "tokens", "str"])
def test_string_prompts_match_tl(any_checkpoint: Path, prompt: Any, return_type: str) -> None:
    """Text in (TL: BOS per the model's default, a batch of strings force-left-padded)."""
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "stop_at_eos": False}
    expected = tl_model(any_checkpoint).generate(
        prompt, verbose=False, return_type=return_type, **kwargs
    )
    actual = our_model(any_checkpoint).generate(prompt, return_type=return_type, **kwargs)
    if isinstance(expected, torch.Tensor):
        _assert_tokens_equal(actual, expected, f"{prompt!r} -> tokens")
    else:
        assert actual == expected


def test_steering_left_padded_batch_matches_tl(any_checkpoint: Path) -> None:
    """Steering a batch of prompts of different lengths (TL: force-left-padded + masked)."""
    vector = _steering_vector(any_checkpoint)

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + vector.to(resid.dtype)

    hooks = [("blocks.1.hook_resid_pre", steer)]
    prompts = [TEXTS[0][:40], TEXTS[3]]
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "stop_at_eos": False}
    with tl_model(any_checkpoint).hooks(fwd_hooks=hooks):
        expected = tl_model(any_checkpoint).generate(
            prompts, verbose=False, return_type="tokens", **kwargs
        )
    actual = our_model(any_checkpoint).generate(
        prompts, return_type="tokens", fwd_hooks=hooks, **kwargs
    )
    _assert_tokens_equal(actual, expected, "steered batch of strings")
