"""The local tokenizer: the server's tokenizer files as a Hugging Face tokenizer, and
TransformerLens 3.9's helpers (``to_tokens``, ``to_str_tokens``, ``to_string``,
``to_single_token``, ``get_token_position``) computed with it, so they make no request.

With ``transformers`` installed the tokenizer is its ``PreTrainedTokenizerFast``; without it,
``LocalTokenizer`` gives the part of that API these helpers and notebooks use, over the
``tokenizers`` library that both are built on.

The files are those of the tokenizer TransformerLens 3.9 runs, which the server built again with
``add_bos_token=True`` as TL does: it adds the BOS itself (``tokenizer("x")`` starts with it) and
``to_tokens(prepend_bos=False)`` takes it off again after truncating to n_ctx.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch
from tokenizers import Tokenizer as Backend
from tokenizers.processors import TemplateProcessing

if TYPE_CHECKING:
    from .config import HookedTransformerConfig

PaddingSide = Literal["left", "right"]
TokensLike = int | Sequence[int] | torch.Tensor | Any  # Any: numpy arrays too


class TokenizationError(ValueError, AssertionError):
    """Bad input to a tokenizer helper. An AssertionError too, because TransformerLens raises
    one in the same places (notebooks catch it, e.g. around ``to_single_token``)."""


class Tokenizer(Protocol):
    """What the helpers need of a tokenizer (Hugging Face's API)."""

    padding_side: str
    bos_token: Any
    add_bos_token: bool

    @property
    def bos_token_id(self) -> Any: ...
    @property
    def backend_tokenizer(self) -> Backend: ...
    @property
    def pad_token_id(self) -> Any: ...

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...
    def encode(self, text: Any, **kwargs: Any) -> Any: ...
    def decode(self, token_ids: Any, **kwargs: Any) -> Any: ...
    def batch_decode(self, sequences: Any, **kwargs: Any) -> Any: ...


# --- building the tokenizer ---------------------------------------------------------------


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def load_tokenizer(
    files: dict[str, str], name: str | None = None, use_transformers: bool | None = None
) -> Tokenizer:
    """A tokenizer from the files ``save_pretrained`` writes (``GET /v1/tokenizer``).
    ``use_transformers`` defaults to whether ``transformers`` is installed."""
    if "tokenizer.json" not in files:
        raise ValueError(
            "the server sent no tokenizer.json, so this model's tokenizer cannot run locally "
            f"(files: {sorted(files)})"
        )
    if use_transformers is None:
        use_transformers = transformers_installed()
    tokenizer = _transformers_tokenizer(files) if use_transformers else _local_tokenizer(files)
    if name is not None:
        tokenizer.name_or_path = name  # type: ignore[attr-defined]
    return _with_fallbacks(_flagged_as_adding_bos(tokenizer))


def _transformers_tokenizer(files: dict[str, str]) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        for file_name, text in files.items():
            if Path(file_name).name != file_name:  # a file name, never a path out of the folder
                raise ValueError(f"refusing tokenizer file name {file_name!r}")
            (Path(folder) / file_name).write_text(text)
        return cast(Tokenizer, PreTrainedTokenizerFast.from_pretrained(folder))


def _local_tokenizer(files: dict[str, str]) -> Tokenizer:
    config: dict[str, Any] = {}
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
        if file_name in files:
            config.update(json.loads(files[file_name]))
    return LocalTokenizer(Backend.from_str(files["tokenizer.json"]), config)


def _flagged_as_adding_bos(tokenizer: Tokenizer) -> Tokenizer:
    """``add_bos_token`` reads True, as on TransformerLens's tokenizer, when this one adds its BOS.

    The server sends TL's tokenizer, re-built with ``add_bos_token=True``; its tokenizer.json
    carries the template that adds the BOS, but not the flag (transformers 5 leaves the flag out
    of what it saves, and ignores it beside a tokenizer.json when loading). Setting the flag
    rewrites the template from the special tokens, so the server's own template is put back:
    the ids stay exactly the server's.
    """
    bos_id = tokenizer.bos_token_id
    # getattr: transformers 4's PreTrainedTokenizerFast has no such flag (the client takes any).
    if bos_id is None or getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    if tokenizer.encode("")[:1] != [bos_id]:
        return tokenizer  # one TL kept as it was: it adds no BOS, and its flag stays False
    template = tokenizer.backend_tokenizer.post_processor
    try:
        tokenizer.add_bos_token = True
    except ValueError:
        # A BOS a template string cannot spell (one with a ':'): TL's re-build failed the same
        # way, and it kept the tokenizer with the flag False.
        tokenizer.add_bos_token = False
    finally:
        tokenizer.backend_tokenizer.post_processor = template
    return tokenizer


def _with_fallbacks(tokenizer: Tokenizer) -> Tokenizer:
    """TransformerLens's ``set_tokenizer``: pad = eos and bos = eos when missing, right padding
    unless the tokenizer says otherwise."""
    if getattr(tokenizer, "eos_token", None) is None:
        tokenizer.eos_token = "<|endoftext|>"  # type: ignore[attr-defined]
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token  # type: ignore[attr-defined]
    if tokenizer.padding_side is None:
        tokenizer.padding_side = "right"
    return tokenizer


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value["content"])
    return None if value is None else str(value)


def _ids(token_ids: TokensLike) -> list[int]:
    return [int(token) for token in torch.as_tensor(token_ids).reshape(-1).tolist()]


# Hugging Face's clean_up_tokenization: the spaces its word-level decoders put before punctuation.
_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


class Encoding(dict[str, Any]):
    """Hugging Face's ``BatchEncoding``: a dict whose keys read as attributes too."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LocalTokenizer:
    """Hugging Face's tokenizer API over a ``tokenizers.Tokenizer``, for clients without
    ``transformers``: encode, decode, ``__call__`` with padding and truncation, special tokens."""

    def __init__(self, backend: Backend, config: dict[str, Any]) -> None:
        self.backend = backend
        backend.no_truncation()  # set per call, as Hugging Face does
        backend.no_padding()
        self.name_or_path: str = str(config.get("name_or_path", ""))
        self.padding_side: str = config.get("padding_side") or "right"
        self.truncation_side: str = config.get("truncation_side") or "right"
        self.model_max_length: int | None = config.get("model_max_length")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.unk_token = _token_text(config.get("unk_token"))
        # Hugging Face's flag, False as transformers 5 reads it beside a tokenizer.json (whose
        # template decides what is added); setting it rewrites the template, as there.
        self._add_bos_token = False

    @property
    def backend_tokenizer(self) -> Backend:
        return self.backend

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        """As in Hugging Face's tokenizers: the post-processor becomes "BOS text" (or "text")."""
        bos, bos_id = self.bos_token, self.bos_token_id
        # Without a BOS token there is nothing to add: the flag stays False (so does HF's).
        adds = bool(value) and bos is not None and bos_id is not None
        if adds:
            template = TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            )
        else:
            template = TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        self.backend.post_processor = template
        self._add_bos_token = adds  # only once the template is built (it may refuse the BOS)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        return list(dict.fromkeys(token for token in tokens if token is not None))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(token) for token in self.all_special_tokens)
        return [token_id for token_id in ids if token_id is not None]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return self._encode([text], add_special_tokens, **kwargs)[0]

    def _encode(
        self,
        texts: list[str],
        add_special_tokens: bool = True,
        truncation: bool | None = None,
        max_length: int | None = None,
    ) -> list[list[int]]:
        limit = max_length if max_length is not None else self.model_max_length
        if truncation and limit is not None and limit < 2**31:
            # The backend's own truncation keeps room for the special tokens it adds.
            self.backend.enable_truncation(limit, direction=self.truncation_side)
        try:
            encoded = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            self.backend.no_truncation()
        return [list(encoding.ids) for encoding in encoded]

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Encoding:
        batched = not isinstance(text, str)
        rows = self._encode(
            list(text) if batched else [cast(str, text)], add_special_tokens, truncation, max_length
        )
        masks = [[1] * len(row) for row in rows]
        if padding in (True, "longest", "max_length"):
            width = max_length if padding == "max_length" and max_length else max(map(len, rows))
            rows, masks = self._pad(rows, masks, width, padding_side or self.padding_side)
        if return_tensors == "pt":
            return Encoding(
                input_ids=torch.tensor(rows, dtype=torch.long),
                attention_mask=torch.tensor(masks, dtype=torch.long),
            )
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported here")
        if batched:
            return Encoding(input_ids=rows, attention_mask=masks)
        return Encoding(input_ids=rows[0], attention_mask=masks[0])

    def _pad(
        self, rows: list[list[int]], masks: list[list[int]], width: int, side: str
    ) -> tuple[list[list[int]], list[list[int]]]:
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError("this tokenizer has no pad token, so it cannot pad a batch")
        padded_rows, padded_masks = [], []
        for row, mask in zip(rows, masks, strict=True):
            fill = width - len(row)
            if side == "left":
                padded_rows.append([pad_id] * fill + row)
                padded_masks.append([0] * fill + mask)
            else:
                padded_rows.append(row + [pad_id] * fill)
                padded_masks.append(mask + [0] * fill)
        return padded_rows, padded_masks

    def decode(
        self,
        token_ids: TokensLike,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        text: str = self.backend.decode(_ids(token_ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            for spaced, joined in _CLEAN_UPS:
                text = text.replace(spaced, joined)
        return text

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        return [self.decode(sequence, **kwargs) for sequence in sequences]

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int):
            return cast(str, self.backend.id_to_token(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [cast(str, self.backend.id_to_token(i)) for i in ids if i not in special]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int | None] | None:
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [cast("int | None", self.convert_tokens_to_ids(token)) for token in tokens]


# --- TransformerLens's helpers ------------------------------------------------------------


# The override below changes the shared tokenizer: threads using one model take turns.
_PADDING_LOCK = threading.RLock()


@contextmanager
def _padding_side(tokenizer: Tokenizer, side: str | None) -> Iterator[str]:
    """Pad on ``side`` for the duration (TransformerLens overrides the tokenizer's the same way)."""
    with _PADDING_LOCK:
        saved = tokenizer.padding_side
        tokenizer.padding_side = side or saved
        try:
            yield tokenizer.padding_side
        finally:
            tokenizer.padding_side = saved


def _prepends_bos(tokenizer: Tokenizer, cfg: HookedTransformerConfig) -> bool:
    if cfg.tokenizer_prepends_bos is None:
        cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    return cfg.tokenizer_prepends_bos


def _without_bos(tokenizer: Tokenizer, tokens: torch.Tensor, side: str) -> torch.Tensor:
    """Drop the BOS the tokenizer added to each row (after the leading pads, left-padded)."""
    bos_id, pad_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    if bos_id is None:
        return tokens
    if side == "right":
        return tokens[..., 1:]
    if bos_id == pad_id:  # the BOS is the last of the leading pads
        bos_at = (tokens.ne(pad_id).cumsum(-1) == 0).sum(-1) - 1
    else:
        bos_at = (tokens == bos_id).int().argmax(-1)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[torch.arange(tokens.shape[0]), bos_at] = False
    return tokens[keep].view(tokens.shape[0], tokens.shape[1] - 1)


def to_tokens(
    tokenizer: Tokenizer,
    cfg: HookedTransformerConfig,
    input: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    truncate: bool = True,
) -> torch.Tensor:
    """Token ids [batch, pos], padded to the longest input, with a BOS per ``prepend_bos``
    (default ``cfg.default_prepend_bos``) whether or not the tokenizer adds one itself."""
    bos = cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    prepends = _prepends_bos(tokenizer, cfg)
    if bos and not prepends and tokenizer.bos_token is not None:
        input = (
            tokenizer.bos_token + input
            if isinstance(input, str)
            else [tokenizer.bos_token + text for text in input]
        )
    with _padding_side(tokenizer, padding_side) as side:
        tokens: torch.Tensor = tokenizer(
            input,
            return_tensors="pt",
            padding=True,
            truncation=truncate,
            max_length=cfg.n_ctx if truncate else None,
        )["input_ids"]
        if not bos and prepends:
            tokens = _without_bos(tokenizer, tokens, side)
    return tokens


def to_string(tokenizer: Tokenizer, tokens: TokensLike) -> str | list[str]:
    """A string for 0-d or 1-d tokens (or a list of ints), a list of strings for 2-d."""
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.tensor(tokens)
    if tokens.dim() == 2:
        return cast("list[str]", tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False))
    if tokens.dim() <= 1:
        return cast(str, tokenizer.decode(tokens, clean_up_tokenization_spaces=False))
    raise ValueError(f"Invalid shape passed in: {tokens.shape}")


def to_str_tokens(
    tokenizer: Tokenizer,
    cfg: HookedTransformerConfig,
    input: str | TokensLike | list[Any],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> list[str] | list[list[str]]:
    """Each token as a string: of a text, of tokens [pos] or [1, pos] (a tensor, an array or,
    beyond TransformerLens, a list of ints); any other list gives a list, item by item."""
    if isinstance(input, list) and not (input and all(isinstance(i, int) for i in input)):
        per_item = [
            to_str_tokens(tokenizer, cfg, item, prepend_bos, padding_side) for item in input
        ]
        return cast("list[list[str]]", per_item)
    if isinstance(input, str):
        tokens = to_tokens(tokenizer, cfg, input, prepend_bos, padding_side)[0]
    elif not isinstance(input, torch.Tensor | list) and not hasattr(input, "__array__"):
        raise ValueError(f"Invalid input type to to_str_tokens: {type(input)}")
    else:
        tokens = torch.as_tensor(input).squeeze()
        if tokens.dim() == 0:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 1:
            raise TokenizationError(
                f"Invalid tokens input to to_str_tokens, has shape: {tokens.shape}"
            )
    # One id per sequence, so that each token decodes on its own.
    return cast(
        "list[str]",
        tokenizer.batch_decode(
            [[int(token)] for token in tokens.tolist()], clean_up_tokenization_spaces=False
        ),
    )


def to_single_token(tokenizer: Tokenizer, cfg: HookedTransformerConfig, string: str) -> int:
    tokens = to_tokens(tokenizer, cfg, string, prepend_bos=False).squeeze()
    if tokens.shape:
        raise TokenizationError(f"Input string: {string} is not a single token!")
    return int(tokens.item())


def get_token_position(
    tokenizer: Tokenizer,
    cfg: HookedTransformerConfig,
    single_token: str | int | torch.Tensor,
    input: str | torch.Tensor,
    mode: Literal["first", "last"] = "first",
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> int:
    """Where ``single_token`` occurs (first or last) in a text or tokens [pos] / [1, pos]."""
    tokens = (
        to_tokens(tokenizer, cfg, input, prepend_bos, padding_side)
        if isinstance(input, str)
        else torch.as_tensor(input)
    )
    if tokens.dim() == 2:
        if tokens.shape[0] != 1:
            raise TokenizationError(
                f"If tokens are rank two, they must have shape [1, seq_len], not {tokens.shape}"
            )
        tokens = tokens[0]
    if isinstance(single_token, str):
        single_token = to_single_token(tokenizer, cfg, single_token)
    elif isinstance(single_token, torch.Tensor):
        single_token = int(single_token.item())
    found = torch.arange(len(tokens))[tokens == single_token]
    if not len(found):
        raise TokenizationError("The token does not occur in the prompt")
    if mode == "first":
        return int(found[0].item())
    if mode == "last":
        return int(found[-1].item())
    raise ValueError(f"mode must be 'first' or 'last', not {mode}")
