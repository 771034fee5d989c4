"""Qwen3, OLMo 2, Gemma 1/2/3 and Phi-3 against Hugging Face and TransformerLens 3.9 on the same
seeded weights (``fixtures.checkpoints``: 2 layers, d_model 64, a sliding window shorter than
the prompts, Gemma 2 soft-caps low enough to bite).

Per family: unprocessed logits equal HF's and processed log-probs HF's (1e-4, fp32); greedy
generation equals HF's ``generate`` (through ``generate`` and through a decode pool, past the
sliding window); ``run_with_cache`` of every hook point equals TransformerLens's (names, firing
order, shapes, values, logits; processed and unprocessed), unpadded and left-padded.

TransformerLens 3.9 has model code and weight converters for all six, but loads Gemma 1/2/3 and
OLMo 2 only by official hub name (``convert_hf_model_config`` hard-codes those configs); the
oracle builds their TL config from the HF config as those entries read (``fixtures.oracle``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    PROCESSING,
    as_dict,
    assert_caches_close,
    assert_close,
    assert_same_keys,
    hf_model,
    left_padded_batch,
    sample_tokens,
)

from fixtures.checkpoints import build_checkpoint
from fixtures.oracle import load_tl_model
from hooklab_server.engine import load_model, load_model_no_processing
from hooklab_server.engine.catalogue import axis_sizes, fires_by_default, hook_shape
from hooklab_server.engine.decode_pool import DecodePool
from hooklab_server.engine.generation import GenerationState, SamplingParams, StoppingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["qwen3", "olmo2", "gemma", "gemma2", "gemma3", "phi3"]

_models: dict[tuple[Path, str, str], Any] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Path:
    # A neutral folder name: TL 3.9 picks an architecture from "gemma"/"llama" in a path.
    folder = tmp_path_factory.mktemp(f"ckpt-f{FAMILIES.index(request.param)}")
    return build_checkpoint(request.param, folder, tokenizer_dir=tokenizer_dir)


def ours(checkpoint: Path, processing: str = "processed") -> Any:
    key = (checkpoint, "ours", processing)
    if key not in _models:
        _models[key] = load_model(str(checkpoint), **PROCESSING[processing])
    return _models[key]


def tl(checkpoint: Path, processing: str = "processed") -> Any:
    key = (checkpoint, "tl", processing)
    if key not in _models:
        _models[key] = load_tl_model(checkpoint, **PROCESSING[processing])
    return _models[key]


@pytest.fixture(params=["processed", "unprocessed"])
def processing(request: pytest.FixtureRequest) -> str:
    return request.param


# ---- Hugging Face --------------------------------------------------------------------------


def test_unprocessed_logits_equal_hugging_face(checkpoint: Path) -> None:
    tokens = sample_tokens(checkpoint)
    with torch.inference_mode():
        reference = hf_model(checkpoint)(tokens).logits
    assert_close(ours(checkpoint, "unprocessed")(tokens), reference, "logits")


def test_processed_log_probs_equal_hugging_face(checkpoint: Path) -> None:
    tokens = sample_tokens(checkpoint)
    with torch.inference_mode():
        reference = hf_model(checkpoint)(tokens).logits.log_softmax(-1)
    logits = ours(checkpoint)(tokens)
    assert_close(logits.log_softmax(-1), reference, "log-probs")


def _hf_greedy(checkpoint: Path, prompt: torch.Tensor, new: int, **kwargs: object) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(checkpoint).generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            **kwargs,
        )  # fmt: skip


def test_greedy_generation_equals_hugging_face(checkpoint: Path) -> None:
    """16 positions in all: past the sliding window (4 or 5), with the soft-caps in force."""
    prompt = sample_tokens(checkpoint)[:1, :6]
    model = ours(checkpoint)
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, stop_at_eos=False)
    assert torch.equal(generated, _hf_greedy(checkpoint, prompt, 10))


def test_decode_pool_generation_equals_hugging_face(checkpoint: Path) -> None:
    """Two generations sharing a decode pool (one left-padded) each produce HF's tokens."""
    tokens, mask, _ = left_padded_batch(checkpoint, lengths=(9, 5))
    model = ours(checkpoint)
    pool = DecodePool(model, max_rows=4, max_positions=32)
    states, logits = {}, {}
    for row in range(2):
        group, first = pool.join(tokens[row : row + 1], mask[row : row + 1])
        states[group] = GenerationState(
            model, tokens[row : row + 1], SamplingParams(do_sample=False),
            StoppingParams(max_new_tokens=8, stop_at_eos=False),
        )  # fmt: skip
        logits[group] = first
    while not all(state.done for state in states.values()):
        chosen = {group: state.choose(logits[group]) for group, state in states.items()}
        if all(state.done for state in states.values()):
            break
        logits = pool.step(chosen)
    reference = _hf_greedy(checkpoint, tokens, 8, attention_mask=mask)
    for row, state in enumerate(states.values()):
        assert torch.equal(state.tokens[0], reference[row]), f"row {row}"


# ---- TransformerLens ---------------------------------------------------------------------------


def test_hook_points_match_tl(checkpoint: Path) -> None:
    """The catalogue: TL's hook_dict, its firing order (run_with_cache's keys) and shapes."""
    model, reference = ours(checkpoint), tl(checkpoint)
    names = model.hook_names
    assert sorted(names) == sorted(reference.hook_dict)
    tokens = sample_tokens(checkpoint)
    _, cache = reference.run_with_cache(tokens, return_cache_object=False)
    cfg = model.cfg
    assert [name for name in names if fires_by_default(name, cfg)] == list(cache)
    sizes = axis_sizes(cfg, *tokens.shape)
    for name, activation in cache.items():
        axes = hook_shape(name, cfg)
        assert tuple(sizes[axis] for axis in axes) == tuple(activation.shape), (name, axes)


def test_run_with_cache_matches_tl(checkpoint: Path, processing: str) -> None:
    tokens = sample_tokens(checkpoint)
    ref_logits, ref_cache = tl(checkpoint, processing).run_with_cache(
        tokens, return_cache_object=False
    )
    logits, cache = ours(checkpoint, processing).run_with_cache(tokens)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")
    assert_close(ours(checkpoint, processing)(tokens), ref_logits, "logits without hooks")


def test_left_padded_batch_matches_tl(checkpoint: Path) -> None:
    tokens, mask, _ = left_padded_batch(checkpoint)
    ref_logits, ref_cache = tl(checkpoint).run_with_cache(
        tokens, attention_mask=mask, return_cache_object=False
    )
    logits, cache = ours(checkpoint).run_with_cache(tokens, attention_mask=mask)
    ours_by_position, ref_by_position = (
        {name: _unflattened(name, value, tokens.shape) for name, value in found.items()}
        for found in (as_dict(cache), ref_cache)
    )
    assert_caches_close(ours_by_position, ref_by_position, attention_mask=mask)
    assert_caches_close({"logits": logits}, {"logits": ref_logits}, attention_mask=mask)


def _unflattened(name: str, value: torch.Tensor, batch_pos: torch.Size) -> torch.Tensor:
    """A per-head qk-norm activation [batch * pos * heads, ...] as [batch, pos, heads, ...], so
    that its positions can be compared (OLMo 2's, [batch, pos, width], already are)."""
    if ".q_norm." in name or ".k_norm." in name:
        return value.view(*batch_pos, -1, value.shape[-1]) if value.dim() == 2 else value
    return value


def test_processing_is_tls(checkpoint: Path) -> None:
    """What from_pretrained skips: folding and centring for post-norm OLMo 2, centring the
    unembedding under Gemma 2's logit soft-cap."""
    cfg, reference = ours(checkpoint).cfg, tl(checkpoint).cfg
    assert cfg.normalization_type == reference.normalization_type
    assert cfg.processing["fold_ln"] == (cfg.original_architecture != "Olmo2ForCausalLM")
    assert cfg.processing["center_unembed"] == (cfg.original_architecture != "Gemma2ForCausalLM")


# ---- the fixtures exercise what they should -----------------------------------------------------


def test_windows_and_soft_caps_change_the_logits(checkpoint: Path) -> None:
    """Without its sliding window or its soft-caps, the model no longer matches HF: the fixture
    features are live, so the parity tests above do test them."""
    model = load_model_no_processing(checkpoint)
    cfg, tokens = model.cfg, sample_tokens(checkpoint)
    with torch.inference_mode():
        reference = hf_model(checkpoint)(tokens).logits
    changes = []
    if cfg.window_size is not None:
        model.windows = [None] * cfg.n_layers
        changes.append("window")
    if cfg.attn_scores_soft_cap > 0:
        for block in model.blocks:
            block.attn.soft_cap = -1.0
        model.unembed.soft_cap = -1.0
        changes.append("soft-caps")
    if not changes:
        pytest.skip("no sliding window or soft-cap in this family")
    assert (model(tokens) - reference).abs().max() > 1e-2, changes


def test_flattened_qk_norm_hooks_stay_in_their_pool_rows(checkpoint: Path) -> None:
    """A hook on a flattened per-head point (q_norm, [batch * pos * heads, ...]) in a decode pool
    sees and changes only its own generation's rows: that generation matches its solo
    ``generate`` with the hook, the other one HF's."""
    model = ours(checkpoint)
    if not model.cfg.use_qk_norm:
        pytest.skip("no per-head q/k norm in this family")
    name = "blocks.0.attn.q_norm.hook_normalized"
    seen: list[tuple[int, ...]] = []

    def flip(value: torch.Tensor, hook: object) -> torch.Tensor:
        seen.append(tuple(value.shape))
        return -value

    prompt = sample_tokens(checkpoint)[:, :6]
    solo = model.generate(
        prompt[:1], max_new_tokens=6, do_sample=False, stop_at_eos=False, fwd_hooks=[(name, flip)]
    )
    heads = model.cfg.n_heads
    assert seen[0] == (6 * heads, model.cfg.d_head) and seen[1] == (heads, model.cfg.d_head)
    pool = DecodePool(model, max_rows=4, max_positions=32)
    hooked, first_hooked = pool.join(prompt[:1], fwd_hooks=[(name, flip)])
    plain, first_plain = pool.join(prompt[1:])
    states = {
        group: GenerationState(
            model,
            prompt[row : row + 1],
            SamplingParams(do_sample=False),
            StoppingParams(max_new_tokens=6, stop_at_eos=False),
        )
        for row, group in enumerate((hooked, plain))
    }
    logits = {hooked: first_hooked, plain: first_plain}
    while True:
        chosen = {group: state.choose(logits[group]) for group, state in states.items()}
        if all(state.done for state in states.values()):
            break
        logits = pool.step(chosen)
    assert torch.equal(states[hooked].tokens, solo)
    assert torch.equal(states[plain].tokens, _hf_greedy(checkpoint, prompt[1:], 6))
    assert not torch.equal(solo, _hf_greedy(checkpoint, prompt[:1], 6))  # the hook did bite
