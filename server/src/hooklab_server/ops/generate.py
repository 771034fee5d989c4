"""Generation behind /v1/generate: validate, then step the engine's KV-cache loop so the API can
stream each token and stop as soon as the client goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import torch

from hooklab_proto import (
    ErrorCode,
    GenerateRequest,
    GenerateResponse,
    GenerateStats,
    GenerateStep,
)
from hooklab_server.engine.generation import generate_tokens, prompt_tokens

from .errors import RequestError
from .run import Runner
from .specs import compile_specs


class Counters:
    """Service counters (exported at /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {
            "generations_started": 0,
            "generations_finished": 0,
            "generations_cancelled": 0,
            "generated_tokens": 0,
        }

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.values[name] += amount


class Generation:
    """One validated generation; iterate to run it a step at a time."""

    def __init__(self, runner: Runner, request: GenerateRequest, counters: Counters) -> None:
        model, settings = runner.model, runner.settings
        self.model, self.request, self.counters = model, request, counters
        text = isinstance(request.input, str) or (
            isinstance(request.input, list) and bool(request.input)
            and isinstance(request.input[0], str)
        )  # fmt: skip
        if text and model.tokenizer is None:
            raise RequestError(ErrorCode.VALIDATION, "this model has no tokenizer; send token ids")
        if text:
            tokens, mask = prompt_tokens(
                model, request.input, request.prepend_bos, request.padding_side, None
            )
        else:
            tokens, mask = runner.ids(request.input, "input").to(model.device), None
        self.text_input = text
        batch, pos = tokens.shape
        total = pos + request.max_new_tokens
        if total > model.cfg.n_ctx:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"{pos} prompt tokens + {request.max_new_tokens} new exceed the context of "
                f"{model.cfg.n_ctx}",
                status=413,
            )
        if batch > settings.max_batch or batch * total > settings.max_tokens:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"{batch} prompts x {total} tokens exceed the limits (batch {settings.max_batch}, "
                f"{settings.max_tokens} tokens per request)",
                status=413,
            )
        bad = tokens[(tokens < 0) | (tokens >= model.cfg.d_vocab)]
        if bad.numel():
            raise RequestError(
                ErrorCode.BAD_INDEX, f"token id {int(bad[0])} is outside the vocabulary"
            )
        eos = request.eos_token_id
        has_eos = model.tokenizer is not None and model.tokenizer.eos_token_id is not None
        if request.stop_at_eos and eos is None and not has_eos:
            raise RequestError(
                ErrorCode.VALIDATION, "stop_at_eos needs eos_token_id for this model"
            )
        hooks = compile_specs(
            request.hooks, model, batch, pos, runner.tensor, runner.cached_activation,
            generation=True,
        )  # fmt: skip
        self.prompt = tokens
        self.new: list[torch.Tensor] = []
        self.steps = generate_tokens(
            model, tokens, mask, request.max_new_tokens, request.stop_at_eos, eos,
            request.do_sample, request.top_k, request.top_p, request.temperature,
            request.freq_penalty, request.use_past_kv_cache, hooks, request.seed,
        )  # fmt: skip
        self.started = time.perf_counter()
        counters.add("generations_started")

    def __iter__(self) -> Iterator[GenerateStep]:
        for step, next_tokens in enumerate(self.steps):
            self.new.append(next_tokens)
            self.counters.add("generated_tokens", next_tokens.numel())
            yield GenerateStep(
                step=step, tokens=next_tokens.tolist(), text=self._decode_each(next_tokens)
            )

    def cancel(self) -> None:
        """Stop the engine loop (the client went away)."""
        self.steps.close()
        self.counters.add("generations_cancelled")

    def _decode_each(self, tokens: torch.Tensor) -> list[str]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            return ["" for _ in tokens]
        return [tokenizer.decode([int(token)]) for token in tokens]

    def run(self) -> GenerateResponse:
        for _ in self:
            pass
        return self.response()

    def response(self) -> GenerateResponse:
        self.counters.add("generations_finished")
        seconds = time.perf_counter() - self.started
        new = torch.stack(self.new, dim=1) if self.new else self.prompt[:, :0]
        output_tokens = torch.cat((self.prompt, new), dim=1)
        tokenizer = self.model.tokenizer
        texts = (
            tokenizer.batch_decode(output_tokens, skip_special_tokens=True) if tokenizer else None
        )
        return_type = self.request.return_type
        if return_type == "input":
            return_type = "str" if self.text_input else "tokens"
        if return_type == "str":
            if texts is None:
                raise RequestError(ErrorCode.VALIDATION, "return_type 'str' needs a tokenizer")
            single = isinstance(self.request.input, str) or len(texts) == 1
            output: str | list[str] | list[list[int]] | list[list[list[float]]]
            output = texts[0] if single else texts
        elif return_type == "embeds":
            output = self.model.W_E[output_tokens].float().tolist()
        else:
            output = output_tokens.tolist()
        count = int(new.numel())
        return GenerateResponse(
            tokens=output_tokens.tolist(),
            text=texts,
            output=output,
            stats=GenerateStats(
                new_tokens=count, seconds=seconds, tokens_per_s=count / max(seconds, 1e-9)
            ),
        )
