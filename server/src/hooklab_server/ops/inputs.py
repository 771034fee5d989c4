"""Token inputs of every operation (forward, generate, patching, detokenize): text, id lists or
integer tensors, resolved into ids with their limits checked — text length before tokenising,
then batch, context and tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import ErrorCode, dtype_code
from hooklab_server.engine.generation import prompt_tokens

from .context import OpsContext
from .errors import RequestError, too_large


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [batch, pos] int64, on the model's device
    mask: torch.Tensor | None  # [batch, pos] 0/1, None when nothing is padding
    text: bool  # the input was text

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def pos(self) -> int:
        return int(self.tokens.shape[1])


def is_text(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and isinstance(value[0], str)
    )


def ids_tensor(value: list[Any], what: str) -> torch.Tensor:
    """Nested lists of integer ids as a [batch, pos] tensor; RequestError when not rectangular
    or outside int64."""
    rows = value if value and isinstance(value[0], list) else [value]
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise RequestError(ErrorCode.BAD_SHAPE, f"{what} must be a non-empty rectangle of ids")
    try:
        return torch.tensor(rows, dtype=torch.long)
    except (ValueError, OverflowError, RuntimeError, TypeError):
        raise RequestError(
            ErrorCode.VALIDATION, f"{what} must hold integers within the int64 range"
        ) from None


def ids(ctx: OpsContext, value: Any, what: str) -> torch.Tensor:
    """Integer ids [batch, pos] from nested lists or a tensor value."""
    if isinstance(value, list):
        return ids_tensor(value, what)
    tensor = ctx.tensor(value, what, ids=True)  # a plain array of integers: int64
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        fractional = tensor.is_floating_point() and bool((tensor != tensor.round()).any())
        raise RequestError(
            ErrorCode.BAD_VALUE if fractional else ErrorCode.BAD_DTYPE,
            f"{what} holds token ids, which are integers; got {dtype_code(tensor.dtype)}"
            + (" with fractional values" if fractional else ""),
            "send integers, e.g. [[464, 2068]] (or a tensor of dtype I64 / I32)",
        )
    if tensor.dim() not in (1, 2):
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"{what} must be token ids of shape [pos] or [batch, pos], got {list(tensor.shape)}",
        )
    if tensor.numel() == 0:
        raise RequestError(ErrorCode.BAD_SHAPE, f"{what} must be a non-empty rectangle of ids")
    return (tensor if tensor.dim() == 2 else tensor.unsqueeze(0)).long()


def check_vocabulary(ctx: OpsContext, tokens: torch.Tensor, what: str = "token id") -> None:
    vocab = ctx.model.cfg.d_vocab
    outside = tokens[(tokens < 0) | (tokens >= vocab)]
    if outside.numel():
        raise RequestError(
            ErrorCode.BAD_INDEX,
            f"{what} {int(outside[0])} is outside the vocabulary (0..{vocab - 1})",
        )


def check_text(ctx: OpsContext, text: str | list[str]) -> None:
    """Bounds checked before a tokenizer sees the text."""
    if ctx.model.tokenizer is None:
        raise RequestError(ErrorCode.VALIDATION, "this model has no tokenizer; send token ids")
    texts = [text] if isinstance(text, str) else text
    limits = ctx.settings
    if len(texts) > limits.max_batch:
        raise too_large("texts", len(texts), limits.max_batch, "max_batch")
    chars = sum(len(item) for item in texts)
    if chars > limits.max_text_chars:
        raise too_large(
            "characters of text", chars, limits.max_text_chars, "max_text_chars",
            "send token ids, or shorter text",
        )  # fmt: skip


def check_size(ctx: OpsContext, batch: int, pos: int, extra: int = 0) -> None:
    """Batch, context and token limits of a forward of ``batch`` x ``pos`` (+ ``extra``
    positions to be generated)."""
    n_ctx, limits = ctx.model.cfg.n_ctx, ctx.settings
    if pos == 0:
        raise RequestError(
            ErrorCode.VALIDATION,
            "the input has no tokens",
            "send text or ids; with prepend_bos false an empty prompt is empty",
        )
    if pos + extra > n_ctx:
        counted = f"{pos} positions" + (f" + {extra} new tokens" if extra else "")
        raise RequestError(
            ErrorCode.TOO_LARGE,
            f"{counted} exceed the model's context of {n_ctx}",
            "send a shorter input" + (", or fewer new tokens" if extra else ""),
        )
    if batch > limits.max_batch:
        raise too_large("prompts", batch, limits.max_batch, "max_batch")
    if batch * (pos + extra) > limits.max_tokens:
        raise too_large(
            "tokens", batch * (pos + extra), limits.max_tokens, "max_tokens",
            "split the batch into several requests",
        )  # fmt: skip


def token_batch(
    ctx: OpsContext,
    value: Any,
    what: str,
    prepend_bos: bool | None,
    padding_side: str | None,
    *,
    generation: bool = False,
    extra: int = 0,
) -> TokenBatch:
    """Validated token ids of an input. Text is tokenised as TransformerLens does for a forward
    (a mask only for left padding) or, with ``generation``, for ``generate`` (several prompts are
    left-padded); text that does not fit the context is refused, never cut."""
    model = ctx.model
    if is_text(value):
        check_text(ctx, value)
        if generation:
            tokens, mask = prompt_tokens(model, value, prepend_bos, padding_side, None, False)
        else:
            tokens, mask = model.tokens_and_mask(value, prepend_bos, padding_side, truncate=False)  # type: ignore[arg-type]
        batch = TokenBatch(tokens.to(model.device), mask, text=True)
    else:
        batch = TokenBatch(ids(ctx, value, what).to(model.device), None, text=False)
    check_size(ctx, batch.batch, batch.pos, extra)
    check_vocabulary(ctx, batch.tokens)
    return batch


def attention_mask(ctx: OpsContext, value: Any, batch: int, pos: int) -> torch.Tensor:
    mask = ids(ctx, value, "attention_mask")
    if tuple(mask.shape) != (batch, pos) or bool(((mask != 0) & (mask != 1)).any()):
        raise RequestError(
            ErrorCode.BAD_SHAPE, f"attention_mask must be 0/1 of shape {[batch, pos]}"
        )
    return mask.to(ctx.model.device)
