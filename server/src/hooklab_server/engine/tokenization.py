"""TransformerLens's tokenizer helpers: ``to_tokens``, ``to_str_tokens``, ``to_string``,
``to_single_token``, ``get_token_position`` and the attention mask for padded batches."""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import HookedConfig

PaddingSide = Literal["left", "right"]

# Architectures whose tokenizer TransformerLens 3.9 keeps as loaded, without add_bos_token=True.
_OWN_BOS_HANDLING = frozenset({"OlmoForCausalLM", "OlmoeForCausalLM", "Olmo2ForCausalLM"})


def tokenizer_with_bos(
    tokenizer: PreTrainedTokenizerBase, architecture: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer TransformerLens 3.9 runs: this one built again with ``add_bos_token=True``.

    TL does so because some tokenizers (Llama's) split a text differently when they add the BOS
    themselves than when it is written in front of the text, and ``add_bos_token`` is fixed when
    a tokenizer is built. The consequences are visible: ``tokenizer("x")`` starts with the BOS,
    ``tokenizer_prepends_bos`` is True, and ``to_tokens(prepend_bos=False)`` truncates to n_ctx
    with the BOS in place before taking it off (n_ctx - 1 tokens). A tokenizer without a BOS
    token, or one already built to add it, is returned as it is.
    """
    if architecture in _OWN_BOS_HANDLING or tokenizer.bos_token is None:
        return tokenizer
    init_kwargs = copy.deepcopy(tokenizer.init_kwargs)
    source = init_kwargs.pop("name_or_path", None)
    asked = init_kwargs.pop("add_bos_token", None)
    if asked is None:
        asked = getattr(tokenizer, "add_bos_token", False)
    if asked:
        return tokenizer
    try:
        rebuilt = _built_again_with_bos(tokenizer, source, init_kwargs)
    except ValueError:
        # A BOS that tokenizers' TemplateProcessing cannot spell (one with a ':'): TL keeps the
        # tokenizer it was given.
        return tokenizer
    # Loading again resets the padding side to the saved one; TL keeps the caller's.
    rebuilt.padding_side = tokenizer.padding_side
    return rebuilt


def _built_again_with_bos(
    tokenizer: PreTrainedTokenizerBase, source: str | None, init_kwargs: dict[str, Any]
) -> PreTrainedTokenizerBase:
    if source:
        try:
            # What TL does: load it again from where it came from, with the same arguments.
            return AutoTokenizer.from_pretrained(source, add_bos_token=True, **init_kwargs)
        except OSError:
            pass  # gone since, or a .gguf file that from_pretrained needs named
    # Nowhere to load it from (built in memory): a copy asked for the BOS rebuilds its template
    # the way loading with add_bos_token=True does.
    rebuilt = copy.deepcopy(tokenizer)
    rebuilt.add_bos_token = True
    return rebuilt


def tokenizer_prepends_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """TL's ``cfg.tokenizer_prepends_bos``: whether encoding adds a token to an empty text."""
    return len(tokenizer.encode("")) > 0


def _leading_pads(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    return tokens.ne(pad_id).cumsum(-1) == 0  # True on the pads before the first real token


def _trailing_pads(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    return tokens.ne(pad_id).flip(-1).cumsum(-1).flip(-1) == 0


def attention_mask_for(
    tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, prepend_bos: bool, padding_side: str
) -> torch.Tensor:
    """1 on real tokens, 0 on the padding of a padded batch (TransformerLens's rule: a BOS that
    shares the pad id is real when BOS was prepended)."""
    mask = torch.ones_like(tokens)
    if padding_side == "right":
        mask[_trailing_pads(tokens, tokenizer.pad_token_id)] = 0
        return mask
    leading = _leading_pads(tokens, tokenizer.pad_token_id)
    mask[leading] = 0
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        first_real = leading.sum(-1)  # index of the BOS that the leading pads absorbed
        rows = torch.arange(tokens.shape[0])
        has_pad = first_real > 0
        mask[rows[has_pad], first_real[has_pad] - 1] = 1
    return mask


def _remove_bos(
    tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, padding_side: str
) -> torch.Tensor:
    if tokenizer.bos_token_id is None:
        return tokens
    if padding_side == "right":
        return tokens[..., 1:]
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        bos_at = _leading_pads(tokens, tokenizer.pad_token_id).sum(-1) - 1
    else:
        bos_at = (tokens == tokenizer.bos_token_id).int().argmax(-1)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[torch.arange(tokens.shape[0]), bos_at] = False
    return tokens[keep].view(tokens.shape[0], -1)


class Tokenization:
    """Mixed into the model: every helper reads ``self.cfg`` and ``self.tokenizer``."""

    cfg: HookedConfig
    tokenizer: PreTrainedTokenizerBase | None

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of strings")
        return self.tokenizer

    def _defaults(
        self, prepend_bos: bool | None, padding_side: PaddingSide | None
    ) -> tuple[bool, str]:
        tokenizer = self._require_tokenizer()
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        return bos, padding_side or tokenizer.padding_side

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Token ids [batch, pos], padded to the longest input, BOS per ``prepend_bos``."""
        tokenizer = self._require_tokenizer()
        prepend_bos, side = self._defaults(prepend_bos, padding_side)
        prepends = bool(self.cfg.tokenizer_prepends_bos)
        if prepend_bos and not prepends:
            bos = tokenizer.bos_token
            input = bos + input if isinstance(input, str) else [bos + text for text in input]
        tokens = tokenizer(
            input,
            return_tensors="pt",
            padding=True,
            truncation=truncate,
            max_length=self.cfg.n_ctx if truncate else None,
            padding_side=side,
        )["input_ids"]
        if not prepend_bos and prepends:
            tokens = _remove_bos(tokenizer, tokens, side)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """1-D tokens to a string; 2-D to a list of strings."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 0:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() == 1:
            return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
        return [self.to_string(row) for row in tokens]  # type: ignore[misc]

    def to_str_tokens(
        self,
        input: str | torch.Tensor | list,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        tokenizer = self._require_tokenizer()
        if isinstance(input, list):
            # A list holds texts or 1-D token ids: one list of strings each.
            per_item = [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
            return cast("list[list[str]]", per_item)
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side)[0]
        else:
            tokens = torch.as_tensor(input).squeeze()
            if tokens.dim() == 0:
                tokens = tokens.unsqueeze(0)
            if tokens.dim() != 1:
                raise ValueError(
                    f"expected tokens of shape [pos] or [1, pos], got {tuple(input.shape)}"
                )
        return tokenizer.batch_decode(tokens[:, None], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        tokens = self.to_tokens(string, prepend_bos=False).squeeze()
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not a single token")
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        # One sequence of ids decodes to one string (a list only comes from a batch).
        return cast(str, self._require_tokenizer().decode([int_token]))

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> int:
        tokens = (
            self.to_tokens(input, prepend_bos, padding_side)
            if isinstance(input, str)
            else torch.as_tensor(input)
        )
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError("get_token_position takes one sequence, not a batch")
            tokens = tokens[0]
        token = (
            self.to_single_token(single_token) if isinstance(single_token, str) else single_token
        )
        found = (tokens == token).nonzero()
        if not len(found):
            raise ValueError(f"token {single_token!r} is not in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        return int(found[0 if mode == "first" else -1].item())
