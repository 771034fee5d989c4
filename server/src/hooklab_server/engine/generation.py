"""Autoregressive generation with a KV cache, hooks active at every step (steering), and
TransformerLens's sampling rules (temperature, frequency penalty, top-k or top-p)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from .tokenization import attention_mask_for

if TYPE_CHECKING:
    from .model import FwdHooks, HookedTransformer


def sample_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from the last logits [batch, d_vocab] (TransformerLens's rules)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty > 0:
        counts = torch.zeros_like(logits)
        counts.scatter_add_(-1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, not {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {top_p}")
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prompt_tokens(
    model: HookedTransformer,
    input: str | list[str] | torch.Tensor,
    prepend_bos: bool | None,
    padding_side: str | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and padding mask; several strings are left-padded (TransformerLens 3.x) so that
    every row's last position is real."""
    if isinstance(input, torch.Tensor):
        tokens = input if input.dim() == 2 else input.unsqueeze(0)
        return tokens.to(model.device), attention_mask
    prepend_bos, side = model._defaults(prepend_bos, padding_side)  # type: ignore[arg-type]
    if isinstance(input, list) and len(input) > 1:
        side = "left"
    tokens = model.to_tokens(input, prepend_bos, side)  # type: ignore[arg-type]
    mask = attention_mask_for(model.tokenizer, tokens, prepend_bos, side)
    return tokens, mask if side == "left" and not bool(mask.all()) else None


def generate_tokens(
    model: HookedTransformer,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    fwd_hooks: FwdHooks = (),
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [batch] step by step (callers may stop early)."""
    if eos_token_id is None and stop_at_eos:
        if model.tokenizer is None or model.tokenizer.eos_token_id is None:
            raise ValueError("stop_at_eos needs eos_token_id when the model has no tokenizer")
        eos_token_id = model.tokenizer.eos_token_id
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, device=tokens.device)
    # Finished rows are padded (TransformerLens's rule) with the one stop id, or, for a list of
    # stop ids, with the tokenizer's eos when it has one, else the first listed id.
    tokenizer_eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    if isinstance(eos_token_id, int) or tokenizer_eos is None:
        pad_id = eos_ids[0] if eos_ids else 0
    else:
        pad_id = tokenizer_eos
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    hooks = model.hook_run(fwd_hooks)
    cache = model.init_kv_cache() if use_past_kv_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    step_input, mask = tokens, attention_mask
    for _ in range(max_new_tokens):
        logits = model.forward(step_input, attention_mask=mask, past_kv_cache=cache, hooks=hooks)
        last = logits[:, -1, :]
        if do_sample:
            next_tokens = sample_logits(
                last, tokens, top_k, top_p, temperature, freq_penalty, generator
            )
        else:
            next_tokens = last.argmax(-1)
        if stop_at_eos and eos_ids:
            next_tokens = torch.where(finished, pad_id, next_tokens)
            finished |= torch.isin(next_tokens, eos)
        tokens = torch.cat((tokens, next_tokens[:, None]), dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat(
                (attention_mask, torch.ones_like(next_tokens[:, None])), dim=1
            )
        yield next_tokens
        if stop_at_eos and bool(finished.all()):
            return
        if cache is not None:
            step_input, mask = next_tokens[:, None], None
        else:
            step_input, mask = tokens, attention_mask


def generate(
    model: HookedTransformer,
    input: str | list[str] | torch.Tensor = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] | None = None,
    return_type: Literal["input", "str", "tokens"] = "input",
    fwd_hooks: FwdHooks = (),
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    verbose: bool = False,
) -> Any:
    """TransformerLens's ``generate``: the prompt plus up to ``max_new_tokens`` new tokens.

    ``verbose`` is accepted for TransformerLens compatibility; the engine prints nothing.
    """
    tokens, mask = prompt_tokens(model, input, prepend_bos, padding_side, attention_mask)
    steps = generate_tokens(
        model, tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
        temperature, freq_penalty, use_past_kv_cache, fwd_hooks, seed,
    )  # fmt: skip
    new = [step[:, None] for step in steps]
    output = torch.cat((tokens, *new), dim=1)
    if return_type == "input":
        return_type = "str" if isinstance(input, str | list) else "tokens"
    if return_type == "tokens":
        return output
    assert model.tokenizer is not None
    texts = model.tokenizer.batch_decode(output, skip_special_tokens=True)
    return texts[0] if isinstance(input, str) or len(texts) == 1 else texts
