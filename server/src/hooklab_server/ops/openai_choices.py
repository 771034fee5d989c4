"""OpenAI choices from a generation's steps: each choice's text (cut before a stop string), its
finish reason, its log-probabilities and the usage, in pieces as the steps come (a stream) or
whole at the end. Row ``i`` of the generation is choice ``i`` (``OpenAIPlan``).

A choice ends at the engine's stop id (finish reason ``stop``; the token counts in the usage, its
text is empty), at a stop string (``stop``), or after ``max_tokens`` (``length``). The engine
pads rows that ended; their later tokens are not read. Streamed text holds back what may still
change: an unfinished character and an end that may grow into a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hooklab_proto import FinishReason, GenerateStep, TokenLogprobs, Usage
from hooklab_server.engine.completion_text import (
    CONTEXT_TOKENS,
    completion_text,
    settled_length,
    stop_position,
    token_text,
)

from .generate import GenerateWork
from .openai_requests import OpenAIPlan


@dataclass(frozen=True)
class ScoredToken:
    token: str  # decoded alone
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens, decoded alone, and theirs
    offset: int  # where the token's text begins in the choice's text


@dataclass(frozen=True)
class ChoiceUpdate:
    """What one step added to a choice: its next text and tokens, and its end if it came."""

    index: int
    text: str
    logprobs: list[ScoredToken]
    finish_reason: FinishReason | None


@dataclass
class _Choice:
    index: int
    context: list[int]  # the prompt's last tokens, decoded before the new ones
    tokens: list[int] = field(default_factory=list)  # its text's tokens (not the stop id)
    full_text: str = ""  # its tokens' text, a stop string included
    text: str = ""  # what it answers: cut before a stop string
    generated: int = 0  # tokens generated for it, the stop id included
    finish_reason: FinishReason | None = None
    logprobs: list[ScoredToken] = field(default_factory=list)
    sent_chars: int = 0  # streamed so far
    sent_logprobs: int = 0


class Choices:
    def __init__(self, plan: OpenAIPlan, work: GenerateWork, tokenizer: Any) -> None:
        self.plan, self.tokenizer = plan, tokenizer
        self.max_new = work.stopping.max_new_tokens
        prompt = work.prompt
        self.stop_ids = _stop_ids(work, tokenizer)
        width = prompt.pos
        context = prompt.tokens[:, max(0, width - CONTEXT_TOKENS) :].tolist()
        self.choices = [_Choice(row, context[row]) for row in range(prompt.batch)]
        real = prompt.mask.sum(-1).tolist() if prompt.mask is not None else [width] * prompt.batch
        # Each prompt counts once, however many choices it has (OpenAI's usage).
        self.prompt_tokens = int(sum(real[plan.row(p, 0)] for p in range(plan.prompts)))

    def add(self, step: GenerateStep) -> list[ChoiceUpdate]:
        """The updates of one generation step, for the choices it changed."""
        updates = []
        for choice in self.choices:
            if choice.finish_reason is not None:
                continue
            row = choice.index
            logprobs = step.logprobs[row] if step.logprobs is not None else None
            self._take(choice, step.tokens[row], logprobs)
            updates.append(self._update(choice))
        return updates

    def finish(self) -> list[ChoiceUpdate]:
        """The generation ended: choices still open ran out of tokens."""
        updates = []
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "length"
                updates.append(self._update(choice))
        return updates

    @property
    def usage(self) -> Usage:
        completion = sum(choice.generated for choice in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def _take(self, choice: _Choice, token: int, logprobs: TokenLogprobs | None) -> None:
        choice.generated += 1
        if token in self.stop_ids:
            choice.finish_reason = "stop"
        else:
            offset = len(choice.full_text)
            choice.tokens.append(token)
            choice.full_text = completion_text(self.tokenizer, choice.context, choice.tokens)
            if logprobs is not None and self.plan.logprobs is not None:
                choice.logprobs.append(self._logprob(token, logprobs, offset))
            cut = stop_position(choice.full_text, self.plan.stops)
            choice.text = choice.full_text if cut is None else choice.full_text[:cut]
            if cut is not None:
                choice.finish_reason = "stop"
        if choice.finish_reason is None and choice.generated >= self.max_new:
            choice.finish_reason = "length"

    def _logprob(self, token: int, logprobs: TokenLogprobs, offset: int) -> ScoredToken:
        count = self.plan.logprobs or 0
        top = [
            (token_text(self.tokenizer, other), value)
            for other, value in zip(
                logprobs.top_ids[:count], logprobs.top_logprobs[:count], strict=True
            )
        ]
        return ScoredToken(token_text(self.tokenizer, token), logprobs.logprob, top, offset)

    def _update(self, choice: _Choice) -> ChoiceUpdate:
        """What is new since the last update: settled text, and every new token's logprob."""
        ready = len(choice.text)
        if choice.finish_reason is None:
            ready = min(ready, settled_length(choice.text, self.plan.stops))
        text = choice.text[choice.sent_chars : ready] if ready > choice.sent_chars else ""
        choice.sent_chars = max(choice.sent_chars, ready)
        logprobs = choice.logprobs[choice.sent_logprobs :]
        choice.sent_logprobs = len(choice.logprobs)
        return ChoiceUpdate(choice.index, text, logprobs, choice.finish_reason)

    def results(self) -> list[ChoiceUpdate]:
        """Every choice whole (after ``finish``), for a response that was not streamed."""
        return [
            ChoiceUpdate(choice.index, choice.text, choice.logprobs, choice.finish_reason)
            for choice in self.choices
        ]


def _stop_ids(work: GenerateWork, tokenizer: Any) -> frozenset[int]:
    """The ids that end a row (the engine's rule: the request's, else the tokenizer's eos)."""
    if not work.stopping.stop_at_eos:
        return frozenset()
    given = work.stopping.eos_token_id
    if given is None:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        return frozenset() if eos is None else frozenset({int(eos)})
    return frozenset([given] if isinstance(given, int) else given)
