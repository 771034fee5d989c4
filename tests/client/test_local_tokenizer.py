"""The client's local tokenizer against TransformerLens 3.9 on the same checkpoint.

The client talks to a stand-in server (an httpx mock transport) that answers ``GET /v1/model``
and ``GET /v1/tokenizer`` with what the real server says about the checkpoint (its own
``describe_model`` and ``tokenizer_files``) and counts every request. Each variant is a
checkpoint whose tokenizer exercises one of TransformerLens's BOS and padding rules; each runs
with the ``transformers`` tokenizer and with the ``tokenizers``-only one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import hooklab
from fixtures.checkpoints import EOS_TOKEN, UNK_TOKEN, build_checkpoint, build_tokenizer
from fixtures.oracle import load_tl_model
from hooklab._transport import Transport
from hooklab_server.engine import load_model
from hooklab_server.ops.describe import describe_model, tokenizer_files
from hooklab_server.settings import Settings

# variant -> (architecture, tokenizer). Architectures set default_prepend_bos (False for NeoX).
VARIANTS = {
    "bos-by-hand": ("gpt2", "plain"),  # the tokenizer adds no BOS: prepended as text
    "no-default-bos": ("neox", "plain"),  # default_prepend_bos=False
    "tokenizer-adds-bos": ("llama", "adds_bos"),  # removed again for prepend_bos=False
    "bos-is-pad": ("gpt2", "bos_is_pad"),  # GPT-2's layout: one token is bos, eos and pad
    "pads-left": ("gpt2", "pads_left"),  # the tokenizer's own padding side is left
    "no-bos-token": ("gpt2", "no_bos"),  # TL keeps it as it is and uses the EOS as BOS
    "bos-with-colon": ("neox", "colon_bos"),  # TL cannot re-build it to add the BOS: kept
}
BACKENDS = ("transformers", "tokenizers")
TEXTS = ["def f(x): return x + 1", "The license", "", "  spaces  and\ttabs\n", "é ü 中文 🙂"]


class StandInServer:
    """Answers what the real server answers about the model and its tokenizer; counts requests."""

    def __init__(self, checkpoint: Path) -> None:
        engine = load_model(str(checkpoint), device="cpu")
        self.files = tokenizer_files(engine)
        self.info = describe_model(engine, Settings(), list(self.files)).model_dump(mode="json")
        self.requests: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if request.url.path == "/v1/model":
            return httpx.Response(200, json=self.info)
        if request.url.path == "/v1/tokenizer":
            return httpx.Response(200, json={"files": self.files})
        error = {"code": "not_found", "message": f"{request.url.path} is not served here"}
        return httpx.Response(404, json={"error": error})

    def connect(self) -> hooklab.HookedTransformer:
        self.requests.clear()
        transport = Transport("http://stand-in")
        transport.client = httpx.Client(
            base_url="http://stand-in", transport=httpx.MockTransport(self.handle)
        )
        return hooklab.HookedTransformer(transport)


class Variant(NamedTuple):
    server: StandInServer
    tl: Any


def _tokenizer_dir(kind: str, plain: Path, factory: pytest.TempPathFactory) -> Path:
    if kind == "plain":
        return plain
    out = factory.mktemp(f"tok-{kind}")
    if kind == "adds_bos":
        build_tokenizer(out, add_bos_token=True)
    elif kind == "bos_is_pad":
        AutoTokenizer.from_pretrained(plain, bos_token=EOS_TOKEN).save_pretrained(out)
    elif kind == "pads_left":
        AutoTokenizer.from_pretrained(plain, padding_side="left").save_pretrained(out)
    else:
        special = {"eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": EOS_TOKEN}
        if kind == "colon_bos":
            special["bos_token"] = "<seed:bos>"  # tokenizers' templates cannot spell it
        backend = Tokenizer.from_file(str(plain / "tokenizer.json"))
        PreTrainedTokenizerFast(
            tokenizer_object=backend, model_max_length=1024, **special
        ).save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=list(VARIANTS))
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Variant:
    arch, kind = VARIANTS[request.param]
    # A neutral folder name: TransformerLens picks architectures from substrings of the path.
    folder = tmp_path_factory.mktemp("tokenizer-variant")
    checkpoint = build_checkpoint(
        arch, folder, tokenizer_dir=_tokenizer_dir(kind, tokenizer_dir, tmp_path_factory)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = load_tl_model(checkpoint)
    return Variant(StandInServer(checkpoint), tl)


@pytest.fixture(params=BACKENDS)
def model(
    request: pytest.FixtureRequest, variant: Variant, monkeypatch: pytest.MonkeyPatch
) -> Iterator[hooklab.HookedTransformer]:
    installed = request.param == "transformers"
    monkeypatch.setattr("hooklab.tokenizer.transformers_installed", lambda: installed)
    client = variant.server.connect()
    yield client
    client.close()


@pytest.fixture
def tl(variant: Variant) -> Any:
    return variant.tl


def same(ours: Any, ref: Any, what: str) -> None:
    """Equal values of equal types; tensors equal in dtype, shape and every element."""
    assert type(ours) is type(ref), f"{what}: {type(ours).__name__} != {type(ref).__name__}"
    if isinstance(ref, torch.Tensor):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours} != {ref}"
        assert torch.equal(ours, ref), f"{what}: {ours} != {ref}"
    elif isinstance(ref, list):
        assert len(ours) == len(ref), f"{what}: {ours} != {ref}"
        for index, (a, b) in enumerate(zip(ours, ref, strict=True)):
            same(a, b, f"{what}[{index}]")
    else:
        assert ours == ref, f"{what}: {ours!r} != {ref!r}"


def same_outcome(ours: Callable[[], Any], ref: Callable[[], Any], what: str) -> None:
    """The same value, or an exception of TransformerLens's type."""
    try:
        expected = ref()
    except Exception as exc:
        with pytest.raises(type(exc)):
            ours()
        return
    same(ours(), expected, what)


def test_to_tokens(model: hooklab.HookedTransformer, tl: Any) -> None:
    inputs: list[str | list[str]] = [*TEXTS, TEXTS[:2], TEXTS[:4]]
    for text in inputs:
        for prepend_bos in (None, True, False):
            for side in (None, "left", "right"):
                same(
                    model.to_tokens(text, prepend_bos=prepend_bos, padding_side=side),
                    tl.to_tokens(text, prepend_bos=prepend_bos, padding_side=side),
                    f"to_tokens({text!r}, prepend_bos={prepend_bos}, padding_side={side})",
                )


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_to_tokens_truncates_to_n_ctx(
    model: hooklab.HookedTransformer, tl: Any, prepend_bos: bool
) -> None:
    """TL truncates with the BOS its tokenizer adds and then drops it for prepend_bos=False
    (n_ctx - 1 tokens); the client's tokenizer is the server's, which is TL's."""
    long = " ".join(["return x + 1"] * 100)
    for text in (long, [long, "short"]):
        ours = model.to_tokens(text, prepend_bos=prepend_bos)
        same(ours, tl.to_tokens(text, prepend_bos=prepend_bos), "truncated")
        assert ours.shape[-1] <= tl.cfg.n_ctx
        same(
            model.to_tokens(text, prepend_bos=prepend_bos, truncate=False),
            tl.to_tokens(text, prepend_bos=prepend_bos, truncate=False),
            "not truncated",
        )


def test_to_str_tokens(model: hooklab.HookedTransformer, tl: Any) -> None:
    tokens = tl.to_tokens(TEXTS[0])
    inputs: list[Any] = [
        *TEXTS, TEXTS[:3], tokens, tokens[0], tokens[0, 3], tokens[0].numpy(), tokens.numpy(),
        [tokens[0], TEXTS[1]], torch.tensor([], dtype=torch.long), tokens.repeat(2, 1),
    ]  # fmt: skip
    for input in inputs:
        for prepend_bos in (None, False):
            same_outcome(
                lambda: model.to_str_tokens(input, prepend_bos=prepend_bos),  # noqa: B023
                lambda: tl.to_str_tokens(input, prepend_bos=prepend_bos),  # noqa: B023
                f"to_str_tokens({input!r}, prepend_bos={prepend_bos})",
            )


def test_to_str_tokens_of_a_list_of_ids(model: hooklab.HookedTransformer, tl: Any) -> None:
    """Beyond TransformerLens (which refuses it): a list of ids reads as tokens [pos]."""
    ids = tl.to_tokens(TEXTS[0])[0]
    with pytest.raises(ValueError):
        tl.to_str_tokens(ids.tolist())
    same(model.to_str_tokens(ids.tolist()), tl.to_str_tokens(ids), "list of ids")


def test_to_string(model: hooklab.HookedTransformer, tl: Any) -> None:
    tokens = tl.to_tokens(TEXTS[:2])
    inputs: list[Any] = [
        int(tokens[0, 1]), tokens[0, 1], tokens[0], tokens, tokens[0].tolist(), tokens.tolist(),
        tokens.numpy(), tokens[None], [tokens[0]],
    ]  # fmt: skip
    for input in inputs:
        same_outcome(
            lambda: model.to_string(input),  # noqa: B023
            lambda: tl.to_string(input),  # noqa: B023
            f"to_string({input!r})",
        )


def _single_token_strings(tl: Any) -> list[str]:
    words = [tl.to_string([token]) for token in range(3, 300)]
    return [word for word in words if tl.to_tokens(word, prepend_bos=False).shape[-1] == 1][:20]


def test_single_tokens_and_positions(model: hooklab.HookedTransformer, tl: Any) -> None:
    singles = _single_token_strings(tl)
    assert singles
    text = "return x + 1; return x"
    tokens = tl.to_tokens(text)
    for word in [*singles, " return", "return", " x", "not a single token"]:
        same_outcome(
            lambda: model.to_single_token(word),  # noqa: B023
            lambda: tl.to_single_token(word),  # noqa: B023
            f"to_single_token({word!r})",
        )
        for input in (text, tokens, tokens[0]):
            for mode in ("first", "last"):
                same_outcome(
                    lambda: model.get_token_position(word, input, mode=mode),  # noqa: B023
                    lambda: tl.get_token_position(word, input, mode=mode),  # noqa: B023
                    f"get_token_position({word!r}, {input!r}, {mode})",
                )
    token = int(tokens[0, -1])
    same(
        model.get_token_position(token, text, "last"),
        tl.get_token_position(token, text, "last"),
        "id",
    )
    same(model.to_single_str_token(token), tl.to_single_str_token(token), "to_single_str_token")
    same_outcome(
        lambda: model.get_token_position(token, tokens.repeat(2, 1)),
        lambda: tl.get_token_position(token, tokens.repeat(2, 1)),
        "a batch of two",
    )


def test_assertion_errors_stay_assertion_errors(model: hooklab.HookedTransformer) -> None:
    """Notebooks catch TransformerLens's AssertionError around these helpers."""
    with pytest.raises(AssertionError):
        model.to_single_token("not a single token")
    with pytest.raises(AssertionError):
        model.get_token_position(" return", "no such word here")


def test_tokenizer_object(model: hooklab.HookedTransformer, tl: Any) -> None:
    ours, ref = model.tokenizer, tl.tokenizer
    assert ours is not None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "bos_token", "padding_side"):
        assert getattr(ours, name) == getattr(ref, name), name
    ids = tl.to_tokens(TEXTS[:2], padding_side="left")
    for row in ids.tolist():
        assert ours.decode(row) == ref.decode(row)
        assert ours.convert_ids_to_tokens(row) == ref.convert_ids_to_tokens(row)
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(
        ids, skip_special_tokens=True
    )
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False
        )
    batch = dict(padding=True, return_tensors="pt", add_special_tokens=False, padding_side="left")
    for key in ("input_ids", "attention_mask"):
        same(ours(TEXTS[:3], **batch)[key], ref(TEXTS[:3], **batch)[key], key)


def test_tokenizer_adds_bos_as_tl(model: hooklab.HookedTransformer, tl: Any) -> None:
    """TL runs its tokenizer re-built with add_bos_token=True: it adds the BOS on every call
    (unless it has none to add), and cfg.tokenizer_prepends_bos says so."""
    ours, ref = model.tokenizer, tl.tokenizer
    assert ours is not None
    model.to_tokens("x")  # fetches the tokenizer and reads tokenizer_prepends_bos, as TL did
    assert model.cfg.tokenizer_prepends_bos is tl.cfg.tokenizer_prepends_bos
    assert ours.add_bos_token == ref.add_bos_token
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), repr(text)
        assert ours(text)["input_ids"] == ref(text)["input_ids"], repr(text)
        cut = {"truncation": True, "max_length": 4}
        assert ours(text, **cut)["input_ids"] == ref(text, **cut)["input_ids"], repr(text)
    for side in ("left", "right"):
        batch = dict(padding=True, return_tensors="pt", padding_side=side)
        for key in ("input_ids", "attention_mask"):
            same(ours(TEXTS, **batch)[key], ref(TEXTS, **batch)[key], f"{side} {key}")


def test_helpers_make_no_request(
    model: hooklab.HookedTransformer, tl: Any, variant: Variant
) -> None:
    """The model line asks for the model; the first helper fetches the tokenizer files, once;
    after that nothing reaches the server."""
    server_requests = variant.server.requests
    assert server_requests == ["/v1/model"]
    tokens = model.to_tokens(TEXTS[:2])
    assert server_requests == ["/v1/model", "/v1/tokenizer"]
    for _ in range(3):
        model.to_str_tokens(TEXTS[0])
        model.to_str_tokens(tokens[0])
        model.to_string(tokens)
        model.to_string(int(tokens[0, 1]))
        model.to_single_token(tl.to_string(tokens[0, 1:2]))
        model.get_token_position(int(tokens[0, 1]), TEXTS[0])
        model.tokenizer.decode(tokens[0])  # type: ignore[union-attr]
    assert server_requests == ["/v1/model", "/v1/tokenizer"]


def test_changed_defaults_apply(model: hooklab.HookedTransformer, tl: Any) -> None:
    """Setting ``cfg.default_prepend_bos`` or the tokenizer's padding side changes the helpers
    as it does in TransformerLens."""
    assert model.tokenizer is not None
    saved = (tl.cfg.default_prepend_bos, tl.tokenizer.padding_side)
    try:
        for prepend_bos in (True, False):
            for side in ("left", "right"):
                model.cfg.default_prepend_bos = tl.cfg.default_prepend_bos = prepend_bos
                model.tokenizer.padding_side = tl.tokenizer.padding_side = side
                same(model.to_tokens(TEXTS[:2]), tl.to_tokens(TEXTS[:2]), f"{prepend_bos} {side}")
    finally:
        tl.cfg.default_prepend_bos, tl.tokenizer.padding_side = saved


def test_numpy_tokens(model: hooklab.HookedTransformer, tl: Any) -> None:
    tokens = np.asarray(tl.to_tokens(TEXTS[0])[0])
    same(model.to_str_tokens(tokens), tl.to_str_tokens(tokens), "numpy")
