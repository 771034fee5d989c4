"""Tokenizer helpers equal TransformerLens 3.9's on the same tokenizer.

TL 3.x prepends BOS by default for GPT-2 and Llama, not for GPT-NeoX (and Qwen2); the fixture
tokenizer adds no BOS itself, but TL's (and so the engine's) is built again to add it.
``prepend_bos=None`` on the engine means "the model's default", which on TL is an omitted
argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    TEXTS,
    assert_close,
    hf_model,
    hf_tokenizer,
    model_type,
    our_model,
    tl_model,
)
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fixtures.checkpoints import EOS_TOKEN, UNK_TOKEN, build_checkpoint, build_tokenizer

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


# ---- TransformerLens's tokenizer: re-built with add_bos_token=True --------------------------
#
# TL 3.9 runs the checkpoint's tokenizer built again with add_bos_token=True (set_tokenizer →
# get_tokenizer_with_bos), reads cfg.tokenizer_prepends_bos off it, and has to_tokens take the
# BOS off again for prepend_bos=False, after truncating to n_ctx with it (n_ctx - 1 tokens).

LONG = " ".join(["return x + 1"] * 100)  # well over n_ctx = 128 tokens
TOKENIZER_TEXTS = ["x", "", " leading space", TEXTS[0], LONG]


def _assert_tokenizer_as_tl(ours: Any, ref: Any) -> None:
    """The model's tokenizer object and cfg.tokenizer_prepends_bos are TL's."""
    assert ours.cfg.tokenizer_prepends_bos is ref.cfg.tokenizer_prepends_bos
    names = ("bos_token", "bos_token_id", "eos_token_id", "pad_token_id", "padding_side")
    for name in (*names, "add_bos_token"):
        assert getattr(ours.tokenizer, name) == getattr(ref.tokenizer, name), name
    for text in TOKENIZER_TEXTS:
        assert ours.tokenizer.encode(text) == ref.tokenizer.encode(text), repr(text)
        assert ours.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"], repr(text)
    for side in ("left", "right"):
        kwargs = {"padding": True, "return_tensors": "pt", "padding_side": side}
        for key in ("input_ids", "attention_mask"):
            _assert_same_tokens(
                ours.tokenizer(TOKENIZER_TEXTS, **kwargs)[key],
                ref.tokenizer(TOKENIZER_TEXTS, **kwargs)[key],
                f"tokenizer(batch, padding_side={side})[{key}]",
            )


def _assert_to_tokens_as_tl(ours: Any, ref: Any) -> None:
    """to_tokens and to_str_tokens of texts and batches, for every prepend_bos, padding side
    and truncation."""
    for text in (*TOKENIZER_TEXTS, TOKENIZER_TEXTS[:3], TOKENIZER_TEXTS):
        for prepend_bos in (None, True, False):
            for side in (None, "left", "right"):
                for truncate in (True, False):
                    what = f"{text!r:.30}, prepend_bos={prepend_bos}, {side}, truncate={truncate}"
                    _assert_same_tokens(
                        ours.to_tokens(text, prepend_bos, side, truncate=truncate),
                        ref.to_tokens(
                            text,
                            truncate=truncate,
                            **_tl_kwargs(prepend_bos=prepend_bos, padding_side=side),
                        ),
                        what,
                    )
            if isinstance(text, str):
                kwargs = _tl_kwargs(prepend_bos=prepend_bos)
                assert ours.to_str_tokens(text, prepend_bos=prepend_bos) == ref.to_str_tokens(
                    text, **kwargs
                ), text


def test_tokenizer_adds_bos_as_tl(any_checkpoint: Path) -> None:
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    assert ref.cfg.tokenizer_prepends_bos is True  # the fixture tokenizer adds none by itself
    _assert_tokenizer_as_tl(ours, ref)
    bos = ref.tokenizer.bos_token_id
    assert ours.tokenizer("x")["input_ids"][0] == bos
    assert ours.tokenizer.encode("") == [bos]


@pytest.mark.parametrize("prepend_bos", [None, True, False], ids=["default", "bos", "no_bos"])
def test_to_tokens_truncates_to_n_ctx(any_checkpoint: Path, prepend_bos: bool | None) -> None:
    """prepend_bos=False gives n_ctx - 1 tokens: TL cuts to n_ctx with the BOS still in."""
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    n_ctx = ref.cfg.n_ctx
    for text in (LONG, [LONG, "short"]):
        for side in ("left", "right"):
            kwargs = _tl_kwargs(prepend_bos=prepend_bos, padding_side=side)
            actual = ours.to_tokens(text, prepend_bos, side)
            _assert_same_tokens(actual, ref.to_tokens(text, **kwargs), f"{prepend_bos} {side}")
            bos = ours.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
            assert actual.shape[-1] == (n_ctx if bos else n_ctx - 1)


# Tokenizers that exercise each branch of TL's rule, on a GPT-2 (prepends BOS by default) and a
# GPT-NeoX (does not) checkpoint.
TOKENIZER_KINDS = (
    "adds_bos",  # its tokenizer.json adds the BOS already (Llama-like)
    "bos_is_pad",  # GPT-2's layout: one token is BOS, EOS and pad
    "pads_left",  # the tokenizer's own padding side is left
    "no_bos",  # no BOS token at all: TL keeps it, then uses the EOS as BOS
    "colon_bos",  # a BOS that tokenizers' templates cannot spell: TL keeps the tokenizer
)


def _variant_tokenizer(kind: str, plain: Path, out: Path) -> Path:
    if kind == "adds_bos":
        build_tokenizer(out, add_bos_token=True)
        return out
    if kind == "bos_is_pad":
        tokenizer = AutoTokenizer.from_pretrained(plain, bos_token=EOS_TOKEN)
    elif kind == "pads_left":
        tokenizer = AutoTokenizer.from_pretrained(plain, padding_side="left")
    else:
        special = {"eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": EOS_TOKEN}
        if kind == "colon_bos":
            special["bos_token"] = "<seed:bos>"
        backend = Tokenizer.from_file(str(plain / "tokenizer.json"))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, model_max_length=1024, **special
        )
    tokenizer.save_pretrained(out)
    return out


VARIANTS = [(kind, arch) for kind in TOKENIZER_KINDS for arch in ("gpt2", "neox")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{k}-{a}" for k, a in VARIANTS])
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Path:
    kind, arch = request.param
    tokenizer = _variant_tokenizer(kind, tokenizer_dir, tmp_path_factory.mktemp(f"tok-{kind}"))
    # A neutral folder name: TransformerLens picks architectures from substrings of the path.
    return build_checkpoint(arch, tmp_path_factory.mktemp("variant"), tokenizer_dir=tokenizer)


def test_variant_tokenizers_as_tl(variant: Path) -> None:
    ours, ref = our_model(variant), tl_model(variant)
    _assert_tokenizer_as_tl(ours, ref)
    _assert_to_tokens_as_tl(ours, ref)


def test_tokenizer_built_in_memory_adds_bos_as_tl(gpt2_checkpoint: Path) -> None:
    """A tokenizer with no folder to load again from (from_hf with one built in memory) adds the
    BOS as the one TL loads from the checkpoint does."""
    from hooklab_server.engine.loading import from_hf

    on_disk = hf_tokenizer(gpt2_checkpoint)
    in_memory = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(on_disk.backend_tokenizer.to_str()),
        bos_token=on_disk.bos_token,
        eos_token=on_disk.eos_token,
        unk_token=on_disk.unk_token,
        pad_token=on_disk.pad_token,
        model_max_length=on_disk.model_max_length,
    )
    ours = from_hf(hf_model(gpt2_checkpoint), in_memory)
    ref = tl_model(gpt2_checkpoint)
    _assert_tokenizer_as_tl(ours, ref)
    _assert_to_tokens_as_tl(ours, ref)
    assert in_memory.encode("") == []  # the caller's tokenizer is left as it was


def test_tokenizer_from_published_files_adds_bos_as_tl(gpt2_checkpoint: Path) -> None:
    """The API tier of a scaled deployment builds the tokenizer from the files a worker
    publishes: it still adds the BOS (the files carry the template, if not the flag)."""
    from hooklab_server.engine.shell import tokenizer_from_files
    from hooklab_server.ops.describe import tokenizer_files

    ours, ref = our_model(gpt2_checkpoint), tl_model(gpt2_checkpoint)
    tokenizer = tokenizer_from_files(tokenizer_files(ours))
    assert tokenizer is not None
    for text in TOKENIZER_TEXTS:
        assert tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"], repr(text)
