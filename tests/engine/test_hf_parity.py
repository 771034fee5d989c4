"""The engine's logits equal Hugging Face ``transformers``' on the same checkpoint.

Unprocessed, raw logits must match; with the default processing ``center_unembed`` shifts each
position's logits by a constant, so log-probabilities are compared there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import as_dict, assert_close, hf_model, our_model, sample_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hf_forward(checkpoint: Path, tokens: torch.Tensor) -> object:
    with torch.no_grad():
        return hf_model(checkpoint)(tokens, output_hidden_states=True)


def test_unprocessed_logits_match_hf(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    expected = _hf_forward(any_checkpoint, tokens).logits
    assert_close(our_model(any_checkpoint, "unprocessed")(tokens), expected, "logits")


def test_processed_log_probs_match_hf(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    expected = _hf_forward(any_checkpoint, tokens).logits.log_softmax(-1)
    actual = our_model(any_checkpoint, "processed")(tokens).log_softmax(-1)
    assert_close(actual, expected, "log_softmax(logits)")


def test_unprocessed_residual_stream_matches_hf_hidden_states(any_checkpoint: Path) -> None:
    """``blocks.L.hook_resid_pre`` is HF's ``hidden_states[L]`` (before any final norm)."""
    tokens = sample_tokens(any_checkpoint)
    hidden = _hf_forward(any_checkpoint, tokens).hidden_states
    ours = our_model(any_checkpoint, "unprocessed")
    n_layers = ours.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    _, cache = ours.run_with_cache(tokens, names_filter=names)
    cache = as_dict(cache)
    for layer, name in enumerate(names):
        assert_close(cache[name], hidden[layer], name)


def test_unprocessed_loss_matches_hf(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    with torch.no_grad():
        expected = hf_model(any_checkpoint)(tokens, labels=tokens).loss
    assert_close(our_model(any_checkpoint, "unprocessed")(tokens, return_type="loss"), expected,
                 "loss")  # fmt: skip
    assert_close(our_model(any_checkpoint, "processed")(tokens, return_type="loss"), expected,
                 "loss (processed)")  # fmt: skip
