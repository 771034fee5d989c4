"""Generation behind /v1/generate: ``validate_generation`` checks the request once; a
:class:`Generation` then steps the engine's KV-cache loop so the API can stream each token and
stop as soon as the client goes away or the deadline passes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hooklab_proto import (
    ErrorCode,
    GenerateRequest,
    GenerateResponse,
    GenerateStats,
    GenerateStep,
    TokenLogprobs,
)
from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.generation import (
    GenerationState,
    NonFiniteLogits,
    SamplingParams,
    StepLogprobs,
    StoppingParams,
    generate_tokens,
)

from ..auth import Account
from .cancel import CancelToken
from .context import OpsContext
from .cost import (
    JSON_BUILD_BYTES_PER_FLOAT,
    JSON_BYTES_PER_FLOAT,
    Cost,
    check_response,
    with_slack,
    working_bytes,
)
from .errors import QuotaExceeded, RequestError
from .inputs import TokenBatch, token_batch
from .specs import HookFn, compile_specs


@dataclass
class GenerateWork:
    prompt: TokenBatch
    sampling: SamplingParams
    stopping: StoppingParams
    hooks: list[tuple[str, HookFn]]
    request: GenerateRequest
    cost: Cost
    caller: Account
    wants_json: bool = True  # a generation answers in JSON (or server-sent events)
    op: str = "generate"
    # The model as this request sees it (its uploaded SAEs attached); None: the served one.
    model: HookedTransformer | None = None


def _stop_ids(ctx: OpsContext, request: GenerateRequest) -> int | list[int] | None:
    eos = request.eos_token_id
    if eos is not None:
        listed = [eos] if isinstance(eos, int) else eos
        vocab = ctx.model.cfg.d_vocab
        outside = [value for value in listed if not 0 <= value < vocab]
        if not listed or outside:
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"eos_token_id {outside[0] if outside else '[]'} is not a token id "
                f"(0..{vocab - 1})",
            )
        return eos
    tokenizer = ctx.model.tokenizer
    if request.stop_at_eos and (tokenizer is None or tokenizer.eos_token_id is None):
        raise RequestError(ErrorCode.VALIDATION, "stop_at_eos needs eos_token_id for this model")
    return None


def _stopping(ctx: OpsContext, request: GenerateRequest) -> StoppingParams:
    if request.stop and ctx.model.tokenizer is None:
        raise RequestError(
            ErrorCode.VALIDATION, "stop strings need a tokenizer; this model has none"
        )
    stop_ids = _stop_ids(ctx, request)
    new, at_eos, stops = request.max_new_tokens, request.stop_at_eos, tuple(request.stop)
    return StoppingParams(new, at_eos, stop_ids, stops)


def validate_generation(ctx: OpsContext, request: GenerateRequest) -> GenerateWork:
    model, cfg = ctx.model, ctx.model.cfg
    new = request.max_new_tokens
    quota = ctx.caller.quotas.get("max_new_tokens")
    if quota is not None and new > quota:
        raise QuotaExceeded(
            "max_new_tokens",
            f"max_new_tokens={new}; key {ctx.caller.name!r} may generate {quota} new tokens "
            "per request (quota max_new_tokens)",
            "ask for fewer new tokens",
            retry_after=None,
        )
    prompt = token_batch(
        ctx, request.input, "input", request.prepend_bos, request.padding_side,
        generation=True, extra=new,
    )  # fmt: skip
    stopping = _stopping(ctx, request)
    sampling = SamplingParams(
        request.do_sample, request.top_k, request.top_p, request.temperature,
        request.freq_penalty, request.seed,
    )  # fmt: skip
    wants_text = request.return_type == "str" or (request.return_type == "input" and prompt.text)
    if wants_text and model.tokenizer is None:
        raise RequestError(ErrorCode.VALIDATION, "return_type 'str' needs a tokenizer")
    hooks = compile_specs(ctx, request.hooks, prompt.batch, prompt.pos, generation=True)
    total = prompt.batch * (prompt.pos + new)
    sent = total * 8  # token ids (and text) as JSON
    building = 0
    if request.return_type == "embeds":
        sent += total * cfg.d_model * JSON_BYTES_PER_FLOAT
        building = total * cfg.d_model * JSON_BUILD_BYTES_PER_FLOAT
    check_response(sent, True, ctx.settings)
    kv = 2 * cfg.n_layers * total * cfg.n_key_value_heads * cfg.d_head * cfg.dtype.itemsize  # type: ignore[operator]
    logits = prompt.batch * prompt.pos * cfg.d_vocab_out * 4
    peak = kv + logits + building + working_bytes(model, prompt.batch, prompt.pos)
    cost = Cost(total, new, with_slack(peak), sent)
    return GenerateWork(prompt, sampling, stopping, hooks, request, cost, ctx.caller)


def _rows(logprobs: StepLogprobs) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(logprob=chosen, top_ids=ids, top_logprobs=values)
        for chosen, ids, values in zip(
            logprobs.chosen.tolist(),
            logprobs.top_ids.tolist(),
            logprobs.top_values.tolist(),
            strict=True,
        )
    ]


def _cannot_sample(exc: NonFiniteLogits) -> RequestError:
    return RequestError(
        ErrorCode.VALIDATION,
        f"cannot sample: {exc}",
        "an intervention pushed the activations out of range; use smaller values or "
        "do_sample=false",
    )


class Generation:
    """One running generation; iterate to run it a step at a time. Counts itself in the metrics:
    started here, then finished (``response``), failed or cancelled (``fail`` / ``cancel``)."""

    def __init__(self, ctx: OpsContext, work: GenerateWork, token: CancelToken) -> None:
        self.ctx, self.work, self.token = ctx, work, token
        self.model = ctx.model
        self.new: list[torch.Tensor] = []
        self.logprobs: list[list[TokenLogprobs]] = []  # per step, when asked for

        def between_layers() -> None:
            token.check()

        # Run alone, the engine's loop steps this state; in a decode pool, ``take`` makes one.
        self.solo = self._new_state()
        self.steps = generate_tokens(
            self.model, work.prompt.tokens, work.prompt.mask, work.sampling, work.stopping,
            work.request.use_past_kv_cache, work.hooks, between_layers, self.solo,
        )  # fmt: skip
        self.state: GenerationState | None = None  # when run in a decode pool
        self.started = time.perf_counter()
        ctx.metrics.add("generations_started")

    def __iter__(self) -> Iterator[GenerateStep]:
        """Run alone: the engine's own KV-cache loop, a step per item."""
        while True:
            self.token.check()
            try:
                next_tokens = next(self.steps)
            except StopIteration:
                return
            except NonFiniteLogits as exc:
                raise _cannot_sample(exc) from None
            yield self._record(next_tokens)

    # --- run in a decode pool: the caller runs the forwards, this chooses the tokens ----------

    def take(self, logits: torch.Tensor) -> GenerateStep:
        """The step chosen from this generation's last logits [batch, d_vocab] (TransformerLens's
        sampling and stopping rules, as ``generate_tokens`` applies them)."""
        if self.state is None:
            self.state = self._new_state()
        try:
            next_tokens = self.state.choose(logits)
        except NonFiniteLogits as exc:
            raise _cannot_sample(exc) from None
        return self._record(next_tokens)

    def _new_state(self) -> GenerationState:
        work = self.work
        return GenerationState(
            self.model, work.prompt.tokens, work.sampling, work.stopping, work.request.logprobs
        )

    @property
    def last_tokens(self) -> torch.Tensor:
        return self.new[-1]

    @property
    def done(self) -> bool:
        return self.state is not None and self.state.done

    def _record(self, next_tokens: torch.Tensor) -> GenerateStep:
        self.new.append(next_tokens)
        self.ctx.metrics.add("work_units", op=self.work.op)
        self.ctx.metrics.add("generated_tokens", next_tokens.numel())
        state = self.state or self.solo
        logprobs = None if state.last_logprobs is None else _rows(state.last_logprobs)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return GenerateStep(
            step=len(self.new) - 1,
            tokens=next_tokens.tolist(),
            text=self._decode_each(next_tokens),
            logprobs=logprobs,
        )

    def close(self) -> None:
        """Stop the engine loop and free its KV cache."""
        self.steps.close()  # type: ignore[attr-defined]

    def _decode_each(self, tokens: torch.Tensor) -> list[str]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            return ["" for _ in tokens]
        return [str(tokenizer.decode([int(token)])) for token in tokens]

    def run(self) -> GenerateResponse:
        for _ in self:
            pass
        return self.response()

    def response(self) -> GenerateResponse:
        self.ctx.metrics.add("generations_finished")
        request, prompt = self.work.request, self.work.prompt.tokens
        seconds = time.perf_counter() - self.started
        new = torch.stack(self.new, dim=1) if self.new else prompt[:, :0]
        output_tokens = torch.cat((prompt, new), dim=1)
        tokenizer = self.model.tokenizer
        texts = (
            tokenizer.batch_decode(output_tokens, skip_special_tokens=True) if tokenizer else None
        )
        return_type = request.return_type
        if return_type == "input":
            return_type = "str" if self.work.prompt.text else "tokens"
        output: str | list[str] | list[list[int]] | list[list[list[float]]]
        if return_type == "str":
            assert texts is not None  # validated: str needs a tokenizer
            single = isinstance(request.input, str) or len(texts) == 1
            output = texts[0] if single else texts
        elif return_type == "embeds":
            output = self.model.W_E[output_tokens].float().tolist()
        else:
            output = output_tokens.tolist()
        count = int(new.numel())
        asked = request.logprobs is not None
        by_row = [list(row) for row in zip(*self.logprobs, strict=True)] if self.logprobs else None
        return GenerateResponse(
            tokens=output_tokens.tolist(),
            text=texts,
            output=output,
            stats=GenerateStats(
                new_tokens=count, seconds=seconds, tokens_per_s=count / max(seconds, 1e-9)
            ),
            logprobs=(by_row or [[] for _ in range(prompt.shape[0])]) if asked else None,
        )
