"""Scaled rotary position embeddings (Hugging Face's ``rope_scaling``) against Hugging Face and
TransformerLens 3.9 on seeded random checkpoints (``fixtures.checkpoints``, 2 layers, d_model 64):

* Gemma 3 with ``linear`` scaling (factor 8) on its global layers, the sliding layers on their
  own base unscaled (as Gemma 3 4B and larger ship);
* Llama with ``llama3`` scaling, its original context (32) placing one frequency in each of the
  kept, blended and divided bands;
* Qwen3 with ``yarn`` (factor 4, original context 4096 at base 1e6: of the 8 rotated pairs,
  two kept, two blended and four divided), as Qwen's long-context configs ship;
* Phi-3 with ``longrope``: original context 16 of 128 (an attention factor of
  sqrt(1 + ln 8 / ln 16)), sequences of 8 tokens (short factors) and 40 (long factors), and a
  generation that crosses from one to the other.

Per model: unprocessed logits equal HF's (1e-4, fp32) and greedy generation equals HF's
``generate``. ``run_with_cache`` equals TransformerLens 3.9 on every hook point for Gemma 3
(TL's ``rotary_scaling_factor``, set by its official Gemma 3 4B+ entries; the oracle builds
Gemma 3 configs from the HF config and is given that field here) and Llama (TL reads llama3
scaling from ``rope_scaling`` into its "NTK by parts" fields). TL 3.9 ignores Phi-3's
``longrope`` (its Phi-3 config reads only ``rope_theta``) and Qwen3's ``yarn`` (it reads yarn
for GPT-OSS and OLMo 3 only), so those two are compared with HF only.

``dynamic`` (frequencies recomputed as a sequence grows) is refused at load, by name.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    sample_tokens,
)

import fixtures.oracle as oracle
from fixtures.checkpoints import build_checkpoint
from hooklab_server.engine import load_model, load_model_no_processing
from hooklab_server.engine.decode_pool import DecodePool, PoolFull

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Per frequency (head_dim 16: 8 of them): Phi-3's short factors stay near 1, the long ones grow.
SHORT_FACTOR = [1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0]
LONG_FACTOR = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 16.0]

SCALED: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-linear": ("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    "llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "qwen3-yarn": (
        "qwen3",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
            }
        },
    ),
    "phi3-longrope": (
        "phi3",
        {
            "original_max_position_embeddings": 16,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": SHORT_FACTOR,
                "long_factor": LONG_FACTOR,
            },
        },
    ),
}
TL_SUPPORTED = ("gemma3-linear", "llama3")
PHI3_SWITCH = 16  # Phi-3's original_max_position_embeddings above

_models: dict[tuple[Path, str, str], Any] = {}


def _build(name: str, folder: Path, tokenizer_dir: Path, scaled: bool = True) -> Path:
    arch, overrides = SCALED[name]
    if not scaled:
        overrides = {key: value for key, value in overrides.items() if key != "rope_scaling"}
    return build_checkpoint(arch, folder, tokenizer_dir=tokenizer_dir, **overrides)


@pytest.fixture(scope="module", params=list(SCALED))
def scaled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> tuple[str, Path]:
    # A neutral folder name: TL 3.9 picks an architecture from "gemma"/"llama" in a path.
    folder = tmp_path_factory.mktemp(f"ckpt-rope{list(SCALED).index(request.param)}")
    return request.param, _build(request.param, folder, tokenizer_dir)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _build("phi3-longrope", tmp_path_factory.mktemp("ckpt-rope-phi"), tokenizer_dir)


@pytest.fixture(scope="module")
def tl_knows_gemma3_scaling() -> Iterator[None]:
    """The oracle's Gemma 3 config (read from the HF config as TL's official entries read)
    with the field those entries set for linear scaling: ``rotary_scaling_factor``."""
    known_by_name = oracle._config_known_by_name

    def with_scaling(architecture: str, hf: Any) -> dict[str, Any]:
        cfg = known_by_name(architecture, hf)
        full = (
            hf.rope_parameters.get("full_attention", {})
            if architecture.startswith("Gemma3")
            else {}
        )
        if full.get("rope_type") == "linear":
            cfg["rotary_scaling_factor"] = full["factor"]
        return cfg

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oracle, "_config_known_by_name", with_scaling)
        yield


def ours(checkpoint: Path, processing: str = "unprocessed") -> Any:
    key = (checkpoint, "ours", processing)
    if key not in _models:
        _models[key] = load_model(str(checkpoint), **PROCESSING[processing])
    return _models[key]


def tl(checkpoint: Path, processing: str) -> Any:
    key = (checkpoint, "tl", processing)
    if key not in _models:
        _models[key] = oracle.load_tl_model(checkpoint, **PROCESSING[processing])
    return _models[key]


def long_tokens(checkpoint: Path, length: int, seed: int = 1) -> torch.Tensor:
    """BOS then seeded random ids: [1, length], longer than the fixture texts run."""
    hf = hf_model(checkpoint).config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, hf.vocab_size, (1, length), generator=generator)
    ids[0, 0] = hf.bos_token_id
    return ids


def _hf_greedy(checkpoint: Path, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(checkpoint).generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )


# ---- Hugging Face ------------------------------------------------------------------------------


def test_logits_equal_hugging_face(scaled: tuple[str, Path]) -> None:
    _, checkpoint = scaled
    tokens = sample_tokens(checkpoint)
    with torch.inference_mode():
        reference = hf_model(checkpoint)(tokens).logits
    assert_close(ours(checkpoint)(tokens), reference, "logits")


def test_greedy_generation_equals_hugging_face(scaled: tuple[str, Path]) -> None:
    """6 prompt tokens and 14 new: 20 positions, past Phi-3's original context of 16 (where
    HF drops its cache and recomputes every position with the long factors)."""
    _, checkpoint = scaled
    prompt = sample_tokens(checkpoint)[:1, :6]
    generated = ours(checkpoint).generate(
        prompt, max_new_tokens=14, do_sample=False, stop_at_eos=False
    )
    assert torch.equal(generated, _hf_greedy(checkpoint, prompt, 14))


@pytest.mark.parametrize("length", [8, 40])
def test_phi3_longrope_short_and_long_sequences_equal_hugging_face(phi3: Path, length: int) -> None:
    """8 tokens: the short factors; 40 (beyond 16): the long ones, at every position."""
    tokens = long_tokens(phi3, length)
    with torch.inference_mode():
        reference = hf_model(phi3)(tokens).logits
    assert_close(ours(phi3)(tokens), reference, "logits")
    log_probs = ours(phi3, "processed")(tokens).log_softmax(-1)
    assert_close(log_probs, reference.log_softmax(-1), "log-probs")


def test_phi3_longrope_generation_from_a_long_prompt_equals_hugging_face(phi3: Path) -> None:
    prompt = long_tokens(phi3, 40)
    generated = ours(phi3).generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    assert torch.equal(generated, _hf_greedy(phi3, prompt, 6))


# ---- TransformerLens ---------------------------------------------------------------------------


@pytest.mark.usefixtures("tl_knows_gemma3_scaling")
@pytest.mark.parametrize("processing", ["processed", "unprocessed"])
def test_run_with_cache_matches_tl(scaled: tuple[str, Path], processing: str) -> None:
    name, checkpoint = scaled
    if name not in TL_SUPPORTED:
        pytest.skip(f"TransformerLens 3.9 ignores this scaling ({name}; compared with HF only)")
    tokens = sample_tokens(checkpoint)
    ref_logits, ref_cache = tl(checkpoint, processing).run_with_cache(
        tokens, return_cache_object=False
    )
    logits, cache = ours(checkpoint, processing).run_with_cache(tokens)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")


# ---- the fixtures exercise what they should ----------------------------------------------------


def test_scaling_changes_the_logits(
    scaled: tuple[str, Path], tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The same weights without the scaling give other logits (beyond 1e-2): the parity tests
    above do test the scaled frequencies (for Phi-3, at 40 tokens: the long factors)."""
    name, checkpoint = scaled
    plain = _build(name, tmp_path / "plain", tokenizer_dir, scaled=False)
    tokens = long_tokens(checkpoint, 40) if name.startswith("phi3") else sample_tokens(checkpoint)
    with torch.inference_mode():
        unscaled = hf_model(plain)(tokens).logits
    assert (ours(checkpoint)(tokens) - unscaled).abs().max() > 1e-2


def test_phi3_long_factors_apply_only_beyond_the_original_context(phi3: Path) -> None:
    """The first 16 positions of a 16-token forward (short factors) differ from the same
    positions inside a 17-token one (long factors), as in HF."""
    tokens = long_tokens(phi3, PHI3_SWITCH + 1)
    model = ours(phi3)
    short, long = model(tokens[:, :PHI3_SWITCH]), model(tokens)[:, :PHI3_SWITCH]
    assert (short - long).abs().max() > 1e-2


@pytest.mark.parametrize("rope_type", ["dynamic"])
def test_unsupported_scaling_is_refused_by_name(
    rope_type: str, tmp_path: Path, tokenizer_dir: Path
) -> None:
    scaling = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 32}
    checkpoint = build_checkpoint(
        "llama", tmp_path, tokenizer_dir=tokenizer_dir, rope_scaling=scaling
    )
    with pytest.raises(NotImplementedError, match=repr(rope_type)):
        load_model_no_processing(str(checkpoint))


def test_a_decode_pool_refuses_a_longrope_row_crossing_its_original_context(phi3: Path) -> None:
    """Pooled keys are written once: a row whose prompt used the short factors may not step past
    the original context (the scheduler runs such a generation alone, which recomputes its
    cache); a prompt already past it decodes in the pool as HF generates."""
    model = ours(phi3)
    pool = DecodePool(model, max_rows=2, max_positions=64)
    short = long_tokens(phi3, 14)
    group, logits = pool.join(short)
    for _ in range(2):  # lengths 14 and 15: the short factors still
        group_token = logits.argmax(-1)
        logits = pool.step({group: group_token})[group]
    with pytest.raises(PoolFull, match="original context"):
        pool.step({group: logits.argmax(-1)})
    pool.leave(group)

    prompt = long_tokens(phi3, 40)
    group, logits = pool.join(prompt)
    generated = [logits.argmax(-1)]
    for _ in range(5):
        logits = pool.step({group: generated[-1]})[group]
        generated.append(logits.argmax(-1))
    expected = _hf_greedy(phi3, prompt, 6)[:, prompt.shape[1] :]
    assert torch.equal(torch.stack(generated, dim=-1), expected)
