"""Shared helpers of the engine oracle tests: cached model loads, sample tokens, comparisons.

Every engine test compares hooklab's engine against a reference (TransformerLens 3.9 or Hugging
Face ``transformers``) on the same checkpoint, never against the engine itself (DESIGN.md §7).
Models are loaded once per (checkpoint, processing) and reused by all tests of the session; a test
that flips a TransformerLens flag resets it (``tl_flag``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fixtures.oracle import load_hf_model, load_tl_model

# Tolerance of every fp32 comparison against a reference.
ATOL = 1e-4

PROCESSED: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
UNPROCESSED: dict[str, bool] = dict.fromkeys(PROCESSED, False)
PROCESSING: dict[str, dict[str, bool]] = {"processed": PROCESSED, "unprocessed": UNPROCESSED}

# Texts the fixture tokenizer (trained on Python's stdlib sources) splits into many tokens.
TEXTS: tuple[str, ...] = (
    "def check_output(*popenargs, timeout=None, **kwargs):\n    return run(*popenargs)",
    'class JSONDecoder(object):\n    """Simple JSON decoder."""\n    def decode(self, s):',
    "import collections.abc as cabc",
    "x = 1",
)


# ---- checkpoints and models ------------------------------------------------------------------


def model_type(checkpoint: Path) -> str:
    """The Hugging Face ``model_type`` of a checkpoint: "gpt2", "llama" or "gpt_neox"."""
    return json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]


def is_gqa(checkpoint: Path) -> bool:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    heads = config.get("num_attention_heads", config.get("n_head"))
    return config.get("num_key_value_heads", heads) != heads


@functools.cache
def our_model(checkpoint: Path, processing: str = "processed") -> Any:
    """hooklab's engine on the checkpoint (fp32, CPU), loaded once per session."""
    from hooklab_server.engine import load_model

    return load_model(str(checkpoint), device="cpu", dtype=torch.float32, **PROCESSING[processing])


@functools.cache
def tl_model(checkpoint: Path, processing: str = "processed") -> Any:
    """TransformerLens 3.9 on the same checkpoint, loaded once per session."""
    return load_tl_model(checkpoint, **PROCESSING[processing])


@functools.cache
def hf_model(checkpoint: Path) -> Any:
    return load_hf_model(checkpoint)


@functools.cache
def hf_tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint)


@contextlib.contextmanager
def tl_flag(model: Any, setter: str) -> Iterator[Any]:
    """Turn a TransformerLens conditional-hook flag on (``set_use_attn_result`` …) for a block."""
    getattr(model, setter)(True)
    try:
        yield model
    finally:
        getattr(model, setter)(False)


# ---- inputs ------------------------------------------------------------------------------------


def text_ids(checkpoint: Path, text: str) -> list[int]:
    """Token ids of ``text`` as the checkpoint's tokenizer encodes it (no special tokens)."""
    return hf_tokenizer(checkpoint)(text, add_special_tokens=False)["input_ids"]


def prompt_ids(checkpoint: Path, index: int, length: int) -> list[int]:
    """BOS followed by the first ``length - 1`` tokens of ``TEXTS[index]``."""
    tokenizer = hf_tokenizer(checkpoint)
    ids = text_ids(checkpoint, TEXTS[index])
    assert len(ids) >= length - 1, f"text {index} has only {len(ids)} tokens"
    return [tokenizer.bos_token_id, *ids[: length - 1]]


def sample_tokens(checkpoint: Path, batch: int = 2, length: int = 12) -> torch.Tensor:
    """A ``[batch, length]`` batch of real text tokens, each row starting with BOS."""
    return torch.tensor([prompt_ids(checkpoint, i, length) for i in range(batch)])


def left_padded_batch(
    checkpoint: Path, lengths: tuple[int, ...] = (12, 7)
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Prompts of different lengths, left-padded with the pad token.

    Returns ``(tokens [batch, max_len], attention_mask [batch, max_len], unpadded rows)``.
    """
    pad = hf_tokenizer(checkpoint).pad_token_id
    rows = [prompt_ids(checkpoint, i, n) for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return tokens, mask, rows


# ---- comparisons -------------------------------------------------------------------------------


def as_dict(cache: Any) -> dict[str, torch.Tensor]:
    """A cache (dict or ActivationCache-like mapping) as a plain dict."""
    if isinstance(cache, Mapping):
        return dict(cache.items())
    return {key: cache[key] for key in cache.keys()}  # noqa: SIM118 (not necessarily a Mapping)


def tensor_mismatch(actual: Any, expected: torch.Tensor, atol: float = ATOL) -> str | None:
    """Why ``actual`` differs from ``expected`` (shape, ±inf pattern, max abs diff); None if close.

    Infinite entries (TransformerLens's masked ``hook_attn_scores`` are -inf) must be infinite, with
    the same sign, in both.
    """
    if not isinstance(actual, torch.Tensor):
        return f"not a tensor: {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if torch.isnan(actual).any() != torch.isnan(expected).any():
        return (
            f"NaN: {int(torch.isnan(actual).sum())} vs expected {int(torch.isnan(expected).sum())}"
        )
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    if not torch.equal(inf_a, inf_e) or not torch.equal(actual[inf_a], expected[inf_e]):
        return (
            f"±inf pattern differs ({int(inf_a.sum())} infinite entries vs expected "
            f"{int(inf_e.sum())}; finite at expected -inf: {actual[inf_e & ~inf_a][:3].tolist()})"
        )
    finite = ~inf_e & ~torch.isnan(expected)
    if finite.any():
        diff = float((actual[finite] - expected[finite]).abs().max())
        if not diff <= atol:
            return f"max abs diff {diff:.3g} > {atol:g}"
    return None


def assert_close(actual: Any, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    problem = tensor_mismatch(actual, expected, atol)
    assert problem is None, f"{what}: {problem}"


def assert_same_keys(actual: dict[str, Any], expected: dict[str, Any], what: str = "cache") -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"{what} keys differ: missing {missing}, unexpected {extra}"


def assert_caches_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    *,
    atol: float = ATOL,
    skip: tuple[str, ...] = (),
    attention_mask: torch.Tensor | None = None,
) -> None:
    """Every key of ``expected`` (except ``skip``) is in ``actual`` and close to it.

    With ``attention_mask`` ``[batch, pos]`` only real (unmasked) positions are compared: the
    position axis is 1, except for ``hook_attn_scores``/``hook_pattern`` ``[b, H, q, k]`` where
    real query rows are compared over all key columns.
    """
    problems = []
    for name, ref in expected.items():
        if name in skip:
            continue
        if name not in actual:
            problems.append(f"{name}: missing")
            continue
        ours = actual[name]
        if attention_mask is not None:
            problem = _masked_mismatch(name, ours, ref, attention_mask, atol)
        else:
            problem = tensor_mismatch(ours, ref, atol)
        if problem is not None:
            problems.append(f"{name}: {problem}")
    assert not problems, f"{len(problems)} activations differ:\n  " + "\n  ".join(problems)


def _masked_mismatch(
    name: str, ours: Any, ref: torch.Tensor, mask: torch.Tensor, atol: float
) -> str | None:
    if not isinstance(ours, torch.Tensor) or ours.shape != ref.shape:
        return tensor_mismatch(ours, ref, atol)
    query_axis = 2 if name.endswith(("hook_attn_scores", "hook_pattern")) else 1
    for row in range(ref.shape[0]):
        real = mask[row].bool().nonzero()[:, 0]
        problem = tensor_mismatch(
            ours[row].index_select(query_axis - 1, real),
            ref[row].index_select(query_axis - 1, real),
            atol,
        )
        if problem is not None:
            return f"row {row} (real positions): {problem}"
    return None
