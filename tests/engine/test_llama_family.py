"""Qwen2 (q/k/v biases, large rope base) and Mistral (sliding-window attention) against Hugging
Face on the same seeded weights: logits, log-probs after processing, and greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.checkpoints import build_checkpoint
from fixtures.oracle import load_hf_model
from hooklab_server.engine import load_model, load_model_no_processing

FAMILY = ["qwen2", "mistral"]


@pytest.fixture(scope="module", params=FAMILY)
def family_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Path:
    folder = tmp_path_factory.mktemp(f"ckpt-{FAMILY.index(request.param)}-family")
    return build_checkpoint(request.param, folder, tokenizer_dir=tokenizer_dir)


def tokens() -> torch.Tensor:
    return torch.randint(3, 900, (2, 12), generator=torch.Generator().manual_seed(0))


def test_unprocessed_logits_equal_hugging_face(family_checkpoint: Path) -> None:
    ours = load_model_no_processing(family_checkpoint)
    with torch.inference_mode():
        reference = load_hf_model(family_checkpoint)(tokens()).logits
    assert (ours(tokens()) - reference).abs().max().item() < 1e-4


def test_processed_log_probs_equal_hugging_face(family_checkpoint: Path) -> None:
    ours = load_model(family_checkpoint)
    with torch.inference_mode():
        reference = load_hf_model(family_checkpoint)(tokens()).logits.log_softmax(-1)
    assert (ours(tokens()).log_softmax(-1) - reference).abs().max().item() < 1e-4


def test_config_reflects_the_family(family_checkpoint: Path) -> None:
    cfg = load_model(family_checkpoint).cfg
    if cfg.original_architecture == "Qwen2ForCausalLM":
        assert cfg.rotary_base == 1e6 and not cfg.default_prepend_bos
        assert load_model_no_processing(family_checkpoint).blocks[0].attn.b_q is not None
    else:
        assert cfg.window_size == 4


def test_greedy_generation_equals_hugging_face(family_checkpoint: Path) -> None:
    prompt = tokens()[:1, :6]
    ours = load_model(family_checkpoint).generate(
        prompt, max_new_tokens=10, do_sample=False, stop_at_eos=False
    )
    with torch.inference_mode():
        reference = load_hf_model(family_checkpoint).generate(
            prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
        )
    assert torch.equal(ours, reference)
