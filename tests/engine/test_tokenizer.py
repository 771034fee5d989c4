"""Tokenizer helpers equal TransformerLens 3.9's on the same tokenizer.

TL 3.x prepends BOS by default for GPT-2 and Llama, not for GPT-NeoX (and Qwen2); the fixture
tokenizer adds no BOS itself. ``prepend_bos=None`` on the engine means "the model's default",
which on TL is an omitted argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import TEXTS, assert_close, hf_tokenizer, model_type, our_model, tl_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STRINGS = [TEXTS[0], TEXTS[2], " leading space", "x"]


def _tl_kwargs(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _assert_same_tokens(actual: Any, expected: torch.Tensor, what: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: not a tensor"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.tolist() == expected.tolist(), f"{what}: {actual.tolist()} != {expected.tolist()}"


def test_default_prepend_bos_per_architecture(any_checkpoint: Path) -> None:
    expected = {"gpt2": True, "llama": True, "gpt_neox": False}[model_type(any_checkpoint)]
    assert tl_model(any_checkpoint).cfg.default_prepend_bos is expected  # the oracle agrees
    assert our_model(any_checkpoint).cfg.default_prepend_bos is expected


@pytest.mark.parametrize("prepend_bos", [None, True, False], ids=["default", "bos", "no_bos"])
def test_to_tokens_single_string(any_checkpoint: Path, prepend_bos: bool | None) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    for text in STRINGS:
        _assert_same_tokens(
            ours.to_tokens(text, prepend_bos=prepend_bos),
            ref.to_tokens(text, **_tl_kwargs(prepend_bos=prepend_bos)),
            repr(text),
        )


@pytest.mark.parametrize("prepend_bos", [None, True, False], ids=["default", "bos", "no_bos"])
@pytest.mark.parametrize(
    "padding_side", [None, "left", "right"], ids=["pad_default", "left", "right"]
)
def test_to_tokens_batch_padding(
    any_checkpoint: Path, prepend_bos: bool | None, padding_side: str | None
) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    _assert_same_tokens(
        ours.to_tokens(STRINGS, prepend_bos=prepend_bos, padding_side=padding_side),
        ref.to_tokens(STRINGS, **_tl_kwargs(prepend_bos=prepend_bos, padding_side=padding_side)),
        f"batch, prepend_bos={prepend_bos}, padding_side={padding_side}",
    )


@pytest.mark.parametrize("prepend_bos", [None, True, False], ids=["default", "bos", "no_bos"])
def test_to_str_tokens(any_checkpoint: Path, prepend_bos: bool | None) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    kwargs = _tl_kwargs(prepend_bos=prepend_bos)
    for text in STRINGS:
        assert ours.to_str_tokens(text, prepend_bos=prepend_bos) == ref.to_str_tokens(
            text, **kwargs
        )
    assert ours.to_str_tokens(STRINGS, prepend_bos=prepend_bos) == ref.to_str_tokens(
        STRINGS, **kwargs
    )


def test_to_str_tokens_of_tensors(any_checkpoint: Path) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    tokens = ref.to_tokens(TEXTS[1])
    assert ours.to_str_tokens(tokens) == ref.to_str_tokens(tokens)  # [1, pos]
    assert ours.to_str_tokens(tokens[0]) == ref.to_str_tokens(tokens[0])  # [pos]


def test_to_string(any_checkpoint: Path) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    batch = ref.to_tokens(STRINGS)
    assert ours.to_string(batch[0]) == ref.to_string(batch[0])  # 1-D -> str
    assert isinstance(ours.to_string(batch[0]), str)
    assert ours.to_string(batch) == ref.to_string(batch)  # 2-D -> list[str]
    assert ours.to_string(batch[0].tolist()) == ref.to_string(batch[0].tolist())


def _single_token_strings(checkpoint: Path) -> list[str]:
    """A few vocabulary entries that encode back to exactly one token."""
    tokenizer = hf_tokenizer(checkpoint)
    found = []
    for token_id in range(100, len(tokenizer), 53):
        text = tokenizer.decode([token_id])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
            found.append(text)
    assert len(found) >= 5
    return found[:8]


def test_to_single_token(any_checkpoint: Path) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    for text in _single_token_strings(any_checkpoint):
        assert ours.to_single_token(text) == ref.to_single_token(text), repr(text)
        assert isinstance(ours.to_single_token(text), int)


@pytest.mark.parametrize("mode", ["first", "last"])
def test_get_token_position(any_checkpoint: Path, mode: str) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    text = TEXTS[0]  # repeats several tokens ("popenargs", "(*", …)
    tokens = ref.to_tokens(text)
    for index in (0, 3, 6):
        token_id = int(tokens[0, index])
        token_str = ref.to_single_str_token(token_id)
        for needle in (token_id, token_str):
            expected = ref.get_token_position(needle, text, mode=mode)
            assert ours.get_token_position(needle, text, mode=mode) == expected, needle
            assert ours.get_token_position(needle, tokens, mode=mode) == ref.get_token_position(
                needle, tokens, mode=mode
            )
            assert ours.get_token_position(needle, tokens[0], mode=mode) == (
                ref.get_token_position(needle, tokens[0], mode=mode)
            )
        for prepend_bos in (True, False):
            if ref.to_single_str_token(token_id) not in ref.to_str_tokens(
                text, prepend_bos=prepend_bos
            ):
                continue
            assert ours.get_token_position(
                token_id, text, mode=mode, prepend_bos=prepend_bos
            ) == ref.get_token_position(token_id, text, mode=mode, prepend_bos=prepend_bos)


@pytest.mark.parametrize("prepend_bos", [None, False], ids=["default", "no_bos"])
@pytest.mark.parametrize("padding_side", [None, "left"], ids=["pad_default", "left"])
def test_string_input_forward_matches_tl(
    any_checkpoint: Path, prepend_bos: bool | None, padding_side: str | None
) -> None:
    """Text into forward: tokenised like TL (left padding masked automatically, as in TL)."""
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    kwargs = {"prepend_bos": prepend_bos, "padding_side": padding_side}
    tl_kwargs = _tl_kwargs(**kwargs)
    for text in (STRINGS[0], STRINGS[:2]):
        assert_close(ours(text, **kwargs), ref(text, **tl_kwargs), f"logits of {text!r}")
        assert_close(
            ours(text, return_type="loss", **kwargs),
            ref(text, return_type="loss", **tl_kwargs),
            f"loss of {text!r}",
        )
