"""OpenAI requests as the GenerateRequest /v1/generate would get, so the same validation, limits,
quotas, scheduler and executors (embedded or workers) run them: one generation path.

The mapping (proto/README.md, "OpenAI-compatible routes"): each prompt is repeated ``n`` times
as batch rows (prompt-major, so choice ``i`` is row ``i``); temperature 0 is greedy, otherwise
sampling at that temperature; top_p 1 keeps every token; ``stop`` strings and ``logprobs`` travel
as GenerateRequest's own fields; a chat's messages go through the tokenizer's chat template and
travel as token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hooklab_proto import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorCode,
    GenerateRequest,
)

from .context import OpsContext
from .errors import RequestError, too_large
from .inputs import is_text


@dataclass(frozen=True)
class OpenAIPlan:
    """An OpenAI request translated: the generation to run and how to answer from its steps."""

    request: GenerateRequest
    prompts: int  # distinct prompts; the generation's rows are prompts x n
    n: int
    stops: tuple[str, ...]
    logprobs: int | None  # alternatives per token; None: no logprobs asked for
    include_usage: bool  # streamed: a last chunk with the usage

    def row(self, prompt: int, choice: int) -> int:
        return prompt * self.n + choice


def plan_completion(ctx: OpsContext, body: CompletionRequest) -> OpenAIPlan:
    prompts = _prompts(body.prompt)
    _check_choices(ctx, len(prompts), body.n)
    rows = [prompt for prompt in prompts for _ in range(body.n)]
    # One text and one choice travels as a string: the very request /v1/generate would get.
    single = len(rows) == 1 and isinstance(rows[0], str)
    input = rows[0] if single else rows
    return _plan(ctx, body, input, len(prompts), body.max_tokens, body.logprobs)


def plan_chat(ctx: OpsContext, body: ChatCompletionRequest) -> OpenAIPlan:
    ids = chat_prompt(ctx, body)
    _check_choices(ctx, 1, body.n)
    new = body.new_tokens or _default_new_tokens(ctx, body.n, len(ids))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _plan(ctx, body, [ids] * body.n, 1, new, logprobs)


def chat_prompt(ctx: OpsContext, body: ChatCompletionRequest) -> list[int]:
    """The messages rendered by the tokenizer's chat template (with the assistant's turn
    opened), as token ids: the template writes any BOS itself."""
    tokenizer = ctx.model.tokenizer
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if tokenizer is None or not template:
        raise RequestError(
            ErrorCode.VALIDATION,
            "this model's tokenizer has no chat template, so chat messages cannot be turned "
            "into a prompt",
            "use /v1/completions with a prompt in the model's own format, or serve a checkpoint "
            "whose tokenizer has a chat_template (tokenizer_config.json or chat_template.jinja)",
        )
    chars = sum(len(message.text) for message in body.messages)
    if chars > ctx.settings.max_text_chars:
        raise too_large(
            "characters of messages", chars, ctx.settings.max_text_chars, "max_text_chars"
        )
    messages: list[dict[str, Any]] = []
    for message in body.messages:
        # OpenAI's "developer" is its newer name for "system", which templates know.
        role = "system" if message.role == "developer" else message.role
        named = {"name": message.name} if message.name is not None else {}
        messages.append({"role": role, "content": message.text, **named})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own refusal (jinja2's raise_exception), or a bug
        raise RequestError(
            ErrorCode.VALIDATION,
            f"the chat template refused the messages: {type(exc).__name__}: {exc}",
            "templates often want alternating user/assistant turns, at most one system first",
        ) from None
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """The distinct prompts: texts, or rows of token ids of one length."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError(ErrorCode.VALIDATION, "prompt: an empty list holds no prompt")
    if is_text(prompt):
        return list(prompt)
    if isinstance(prompt[0], int):
        return [prompt]
    rows: list[Any] = list(prompt)
    if len({len(row) for row in rows}) > 1:
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            "prompt: token-id prompts of different lengths are not batched",
            "send texts (they are left-padded), or one request per length",
        )
    return rows


def _check_choices(ctx: OpsContext, prompts: int, n: int) -> None:
    limit = ctx.settings.max_batch
    if prompts * n > limit:
        raise too_large(
            f"choices ({prompts} prompt(s) x n={n})", prompts * n, limit, "max_batch",
            "ask for fewer choices (n) per request, or send fewer prompts",
        )  # fmt: skip


def _default_new_tokens(ctx: OpsContext, rows: int, prompt: int) -> int:
    """A chat without max_tokens: what the context, the token limit and the key's quota
    leave (at least one; a prompt with no room left is refused by validation, naming why)."""
    room = [
        ctx.model.cfg.n_ctx - prompt,
        ctx.settings.max_tokens // max(rows, 1) - prompt,
        ctx.caller.quotas.get("max_new_tokens", ctx.model.cfg.n_ctx),
    ]
    return max(1, min(room))


def _plan(
    ctx: OpsContext,
    body: CompletionRequest | ChatCompletionRequest,
    input: Any,
    prompts: int,
    new_tokens: int,
    logprobs: int | None,
) -> OpenAIPlan:
    tokenizer = ctx.model.tokenizer
    greedy = body.temperature == 0.0
    request = GenerateRequest(
        model=body.model,
        input=input,
        max_new_tokens=new_tokens,
        stop_at_eos=tokenizer is not None and tokenizer.eos_token_id is not None,
        do_sample=not greedy,
        top_p=None if body.top_p == 1.0 else body.top_p,
        temperature=1.0 if greedy else body.temperature,
        seed=body.seed,
        stop=body.stop_strings,
        logprobs=logprobs,
        stream=body.stream,
        hooks=body.hooks,
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return OpenAIPlan(request, prompts, body.n, tuple(body.stop_strings), logprobs, include_usage)
