"""Autoregressive generation with a KV cache, hooks active at every step (steering), and
TransformerLens's sampling rules (temperature, frequency penalty, top-k or top-p); beyond them,
stop strings and each step's log-probabilities (what OpenAI-style completions report)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from .completion_text import CONTEXT_TOKENS, completion_text, stop_position
from .tokenization import attention_mask_for

if TYPE_CHECKING:
    from .model import FwdHooks, HookedTransformer


class NonFiniteLogits(ValueError):
    """Sampling met NaN or infinite logits (an intervention pushed the model out of range)."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (TransformerLens's ``generate`` arguments)."""

    do_sample: bool = True
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    freq_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, not {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, not {self.temperature}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass(frozen=True)
class StoppingParams:
    """When generation ends: after ``max_new_tokens``, or when every row produced a stop id or
    new text holding one of ``stop_strings`` (a row that stopped is padded, as after eos)."""

    max_new_tokens: int = 10
    stop_at_eos: bool = True
    eos_token_id: int | list[int] | None = None
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepLogprobs:
    """Log-probabilities of one step, from the logits the model gave (hooks applied; before
    temperature, penalties and top-k/p): the chosen tokens' [batch], and the ``k`` most likely
    tokens' ids and values [batch, k]."""

    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor


# What a log-probability below any float32 one reads as (OpenAI's floor): finite, for JSON.
LOGPROB_FLOOR = -9999.0


def step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> StepLogprobs:
    """The log-probabilities of ``chosen`` [batch] and the top ``k`` under ``logits``."""
    logprobs = logits.float().log_softmax(-1)
    logprobs = logprobs.nan_to_num(LOGPROB_FLOOR, LOGPROB_FLOOR, LOGPROB_FLOOR).clamp_min(
        LOGPROB_FLOOR
    )
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    picked = logprobs.gather(-1, chosen[:, None].to(logprobs.device))[:, 0]
    return StepLogprobs(picked, top.indices, top.values)


def sample_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from the last logits [batch, d_vocab] (TransformerLens's rules)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float()
    if not bool(logits.isfinite().all()):
        raise NonFiniteLogits("the logits hold NaN or infinite values; cannot sample from them")
    scaled = logits / params.temperature
    if not bool(scaled.isfinite().all()):
        # A tiny temperature overflows; softmax is shift-invariant, so scale from the maximum
        # (the maximum stays 0 even where the temperature underflows to 0 in float32).
        shifted = logits - logits.amax(-1, keepdim=True)
        scaled = torch.where(shifted == 0, 0.0, shifted / params.temperature)
    logits = scaled
    if params.freq_penalty > 0:
        counts = torch.zeros_like(logits)
        counts.scatter_add_(-1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - params.freq_penalty * counts
    if params.top_k is not None:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif params.top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative > params.top_p
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
    truncate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and padding mask; several strings are left-padded (TransformerLens 3.x) so that
    every row's last position is real."""
    if isinstance(input, torch.Tensor):
        tokens = input if input.dim() == 2 else input.unsqueeze(0)
        return tokens.to(model.device), attention_mask
    prepend_bos, side = model._defaults(prepend_bos, padding_side)  # type: ignore[arg-type]
    if isinstance(input, list) and len(input) > 1:
        side = "left"
    tokens = model.to_tokens(input, prepend_bos, side, truncate=truncate)  # type: ignore[arg-type]
    mask = attention_mask_for(model._require_tokenizer(), tokens, prepend_bos, side)
    return tokens, mask if side == "left" and not bool(mask.all()) else None


class GenerationState:
    """The tokens of one generation so far and TransformerLens's rules for the next ones:
    sampling, stop ids, and padding of finished rows. Give it each step's last logits; callers
    that run their own forwards (a decode pool) use it as ``generate_tokens`` does."""

    def __init__(
        self,
        model: HookedTransformer,
        tokens: torch.Tensor,
        sampling: SamplingParams = SamplingParams(),
        stopping: StoppingParams = StoppingParams(),
        logprobs: int | None = None,
    ) -> None:
        """``logprobs``: keep each step's :class:`StepLogprobs` with this many alternatives
        (``last_logprobs``); None keeps none."""
        eos_token_id, stop_at_eos = stopping.eos_token_id, stopping.stop_at_eos
        if eos_token_id is None and stop_at_eos:
            if model.tokenizer is None or model.tokenizer.eos_token_id is None:
                raise ValueError("stop_at_eos needs eos_token_id when the model has no tokenizer")
            eos_token_id = model.tokenizer.eos_token_id
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos = torch.tensor(eos_ids, device=tokens.device) if stop_at_eos else None
        self.stop_strings = stopping.stop_strings
        if self.stop_strings and model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = model.tokenizer
        # Rows end by a stop id or a stop string; without either, only max_new_tokens ends them.
        self.stops_rows = bool(self.stop_strings) or (self.eos is not None and bool(eos_ids))
        # Finished rows are padded (TransformerLens's rule) with the one stop id, or, for a list
        # of stop ids, with the tokenizer's eos when it has one, else the first listed id.
        tokenizer_eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
        if isinstance(eos_token_id, int) or tokenizer_eos is None:
            self.pad_id = eos_ids[0] if eos_ids else 0
        else:
            self.pad_id = tokenizer_eos
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=tokens.device).manual_seed(sampling.seed)
        self.sampling, self.max_new_tokens = sampling, stopping.max_new_tokens
        self.tokens = tokens  # [batch, pos]: the prompt, then each step's tokens
        self.prompt_width = int(tokens.shape[1])
        self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        self.steps = 0
        self.logprobs = logprobs
        self.last_logprobs: StepLogprobs | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token ids [batch] from the last logits [batch, d_vocab]."""
        next_tokens = sample_logits(logits, self.tokens, self.sampling, self.generator)
        if self.stops_rows:
            next_tokens = torch.where(self.finished, self.pad_id, next_tokens)
        if self.eos is not None and self.eos.numel():
            self.finished |= torch.isin(next_tokens, self.eos)
        if self.logprobs is not None:
            self.last_logprobs = step_logprobs(logits, next_tokens, self.logprobs)
        self.tokens = torch.cat((self.tokens, next_tokens[:, None]), dim=1)
        self.steps += 1
        if self.stop_strings:
            self._stop_rows_by_text()
        return next_tokens

    def _stop_rows_by_text(self) -> None:
        """Finish each row whose new text now holds a stop string. One that was not there a
        step ago ends in the last token's text, so only the last tokens are decoded: a stop
        string of L characters (at most 4L bytes) spans at most 4L tokens before the last."""
        window = 4 * max(len(stop) for stop in self.stop_strings) + 1
        start = max(self.prompt_width, int(self.tokens.shape[1]) - window)
        first = max(0, start - CONTEXT_TOKENS)
        tail = self.tokens[:, first:].tolist()  # one copy from the device for every row
        for row in (~self.finished).nonzero()[:, 0].tolist():
            context, new = tail[row][: start - first], tail[row][start - first :]
            text = completion_text(self.tokenizer, context, new)
            if stop_position(text, self.stop_strings) is not None:
                self.finished[row] = True

    @property
    def done(self) -> bool:
        """After ``max_new_tokens`` steps, or once every row produced a stop id or string."""
        everyone_stopped = self.stops_rows and bool(self.finished.all())
        return self.steps >= self.max_new_tokens or everyone_stopped


def generate_tokens(
    model: HookedTransformer,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingParams = SamplingParams(),
    stopping: StoppingParams = StoppingParams(),
    use_past_kv_cache: bool = True,
    fwd_hooks: FwdHooks = (),
    interrupt: Callable[[], None] | None = None,
    state: GenerationState | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [batch] step by step (callers may stop early). ``interrupt`` is
    called before every block of every step; it stops the generation by raising. ``state``: the
    caller's own (made for ``tokens``, ``sampling`` and ``stopping``), to read what it keeps."""
    state = state or GenerationState(model, tokens, sampling, stopping)
    hooks = model.hook_run(fwd_hooks, interrupt=interrupt)
    reserve = int(tokens.shape[1]) + state.max_new_tokens
    cache = model.init_kv_cache(reserve) if use_past_kv_cache else None
    step_input, mask = tokens, attention_mask
    switch = model.cfg.longrope_original_ctx_len
    while not state.done:
        cached = cache.length if cache is not None else 0
        if switch is not None and 0 < cached <= switch < cached + step_input.shape[1]:
            # longrope: past the original context every position takes the long factors, so
            # the cached keys (short factors) are stale; recompute them all, as HF does.
            cache = model.init_kv_cache(reserve)
            step_input, mask = state.tokens, attention_mask
        logits = model.last_logits(
            step_input, attention_mask=mask, past_kv_cache=cache, hooks=hooks
        )
        next_tokens = state.choose(logits)
        if attention_mask is not None:
            attention_mask = torch.cat(
                (attention_mask, torch.ones_like(next_tokens[:, None])), dim=1
            )
        yield next_tokens
        if cache is not None:
            step_input, mask = next_tokens[:, None], None
        else:
            step_input, mask = state.tokens, attention_mask


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
    sampling = SamplingParams(do_sample, top_k, top_p, temperature, freq_penalty, seed)
    stopping = StoppingParams(max_new_tokens, stop_at_eos, eos_token_id)
    steps = generate_tokens(model, tokens, mask, sampling, stopping, use_past_kv_cache, fwd_hooks)
    new = [step[:, None] for step in steps]
    output = torch.cat((tokens, *new), dim=1)
    if return_type == "input":
        return_type = "str" if isinstance(input, str | list) else "tokens"
    if return_type == "tokens":
        return output
    assert model.tokenizer is not None
    texts = model.tokenizer.batch_decode(output, skip_special_tokens=True)
    return texts[0] if isinstance(input, str) or len(texts) == 1 else texts
