"""Shared helpers of the client oracle tests: cached model loads, paired caches, comparisons.

Every comparison is hooklab vs TransformerLens 3.9 on the same weights and tokens, never hooklab
against itself. Models and raw cache dicts are computed once per session; each test wraps fresh
shallow copies, so methods that add or replace entries (``compute_head_results``,
``remove_batch_dim``) cannot leak into another test.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import ActivationCache as TLActivationCache

from fixtures.oracle import load_tl_model
from hooklab.activation_cache import ActivationCache

# Tolerance of every fp32 comparison against TransformerLens.
ATOL = 1e-4
RTOL = 1e-4

PROCESSING: dict[str, dict[str, bool]] = {
    "processed": dict.fromkeys(
        ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), True
    ),
    "unprocessed": dict.fromkeys(
        ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), False
    ),
}
N_POS = 5


@functools.cache
def our_model(checkpoint: Path, processing: str) -> Any:
    from hooklab_server.engine import load_model

    return load_model(str(checkpoint), device="cpu", dtype=torch.float32, **PROCESSING[processing])


@functools.cache
def tl_model(checkpoint: Path, processing: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_tl_model(checkpoint, **PROCESSING[processing])


@functools.cache
def tokens(checkpoint: Path, batch: int) -> torch.Tensor:
    vocab = tl_model(checkpoint, "processed").cfg.d_vocab
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, N_POS), generator=generator)[:batch]


@functools.cache
def _raw_caches(
    checkpoint: Path, processing: str, batch: int, remove_batch_dim: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    toks = tokens(checkpoint, batch)
    _, ours = our_model(checkpoint, processing).run_with_cache(
        toks, remove_batch_dim=remove_batch_dim
    )
    _, ref = tl_model(checkpoint, processing).run_with_cache(
        toks, remove_batch_dim=remove_batch_dim, return_cache_object=False
    )
    return dict(ours), dict(ref)


def cache_pair(
    checkpoint: Path, processing: str, batch: int = 2, remove_batch_dim: bool = False
) -> tuple[ActivationCache, TLActivationCache]:
    """(hooklab cache over the engine, TransformerLens cache) for the same tokens; fresh dicts."""
    ours, ref = _raw_caches(checkpoint, processing, batch, remove_batch_dim)
    has_batch_dim = not remove_batch_dim
    return (
        ActivationCache(dict(ours), our_model(checkpoint, processing), has_batch_dim),
        TLActivationCache(dict(ref), tl_model(checkpoint, processing), has_batch_dim),
    )


@functools.cache
def single_token_string(checkpoint: Path) -> tuple[str, int]:
    """A string that is exactly one token for TransformerLens (and its id)."""
    model = tl_model(checkpoint, "processed")
    for token in range(40, 400):
        text = model.to_string(torch.tensor([token]))
        try:
            if model.to_single_token(text) == token:
                return text, token
        except AssertionError:
            continue
    raise AssertionError("no single-token string found")


def assert_same(ours: Any, ref: Any, what: str = "value") -> None:
    """Recursively equal: tensors within tolerance (same shape and dtype), other values exactly."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{what}: {type(ours)} is not a tensor"
        assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")
    elif isinstance(ref, tuple | list):
        assert isinstance(ours, tuple | list), f"{what}: {type(ours)} is not a sequence"
        assert len(ours) == len(ref), f"{what}: length {len(ours)} != {len(ref)}"
        for index, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same(a, b, f"{what}[{index}]")
    else:
        assert ours == ref, f"{what}: {ours!r} != {ref!r}"


def assert_same_outcome(
    ours: Callable[[], Any], ref: Callable[[], Any], what: str, error_types: tuple[type, ...] = ()
) -> None:
    """Both calls return the same value, or both fail (with the same exception type, or one of
    ``error_types`` where hooklab's error is deliberately different)."""
    try:
        expected = ref()
    except Exception as exc:  # TransformerLens refused: hooklab must refuse too
        with pytest.raises((type(exc), *error_types)):
            ours()
        return
    assert_same(ours(), expected, what)
