"""OpenAI-compatible generation: ``POST /v1/completions`` and ``POST /v1/chat/completions``, JSON
or server-sent events (``data: {chunk}`` … ``data: [DONE]``), so any OpenAI SDK can generate,
with the ``hooks`` extension for interventions.

Each request becomes the GenerateRequest /v1/generate would get (``ops/openai_requests.py``) and
runs through the same validation, quotas and executor. Errors keep hooklab's envelope
``{"error": {"code", "message", "hint", "request_id"}}``, which OpenAI's SDKs read (they take
``error.message`` and ``error.code``); one after the stream started is a ``data: {"error": …}``
event, which they raise. A client that leaves stops the generation at its next step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from hooklab_proto import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    GenerateResponse,
    GenerateStep,
)

from ..models import ModelEntry
from ..ops import CancelToken, GenerateWork, OpsContext, RequestError
from ..ops.openai_choices import Choices
from ..ops.openai_requests import OpenAIPlan, plan_chat, plan_completion
from ..quotas import Admission
from .bodies import ClosingStream, parse
from .edge import account_of, request_id_of
from .errors import ClientGone, error_json, internal_error
from .openai_replies import Reply
from .openapi import request_body, schema_of
from .routes import ERRORS
from .running import HooklabRoute, admit, cancel_token, collect_generation, generation, validate
from .state import model_entry

logger = logging.getLogger("hooklab_server")
router = APIRouter(route_class=HooklabRoute, responses=ERRORS)
_DONE = b"data: [DONE]\n\n"


def _streamed(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {"text/event-stream": schema_of(chunk)}}}


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=_streamed(Completion),
    tags=["openai"],
    openapi_extra=request_body(CompletionRequest),
)
async def completions(request: Request) -> Response | Completion | ChatCompletion:
    """OpenAI's legacy completions: each prompt continued ``n`` times, with hook specs active at
    every step (``hooks``). With ``stream`` the text arrives as ``text_completion`` chunks."""
    return await _answer(request, await parse(request, CompletionRequest))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=_streamed(ChatCompletionChunk),
    tags=["openai"],
    openapi_extra=request_body(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response | Completion | ChatCompletion:
    """OpenAI's chat completions: the messages through the tokenizer's chat template (422 when
    it has none), with hook specs active at every step (``hooks``)."""
    return await _answer(request, await parse(request, ChatCompletionRequest))


async def _answer(
    request: Request, body: CompletionRequest | ChatCompletionRequest
) -> Response | Completion | ChatCompletion:
    token = cancel_token(request, None)  # the deadline covers the translation too
    entry = await model_entry(request, body.model)
    ctx = entry.operations.ctx.as_caller(account_of(request.scope))
    chat = isinstance(body, ChatCompletionRequest)
    plan = await run_in_threadpool(_plan, ctx, body)  # a chat template, tokenizing: in a thread
    work = await validate(request, entry, plan.request)
    assert isinstance(work, GenerateWork)
    admission = await admit(request, work)
    choices = Choices(plan, work, ctx.model.tokenizer)
    reply = Reply.to(request_id_of(request.scope), entry.name, chat, plan.logprobs is not None)
    if not body.stream:
        steps: list[GenerateStep] = []
        await collect_generation(request, entry, work, token, admission, steps.append)

        def answer() -> Completion | ChatCompletion:  # decoding: off the event loop
            for step in steps:
                choices.add(step)
            choices.finish()
            return reply.response(choices.results(), choices.usage)

        return await run_in_threadpool(answer)
    return ClosingStream(
        _events(request, entry, work, token, admission, choices, reply),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


def _plan(ctx: OpsContext, body: CompletionRequest | ChatCompletionRequest) -> OpenAIPlan:
    if isinstance(body, ChatCompletionRequest):
        return plan_chat(ctx, body)
    return plan_completion(ctx, body)


def _data(body: BaseModel) -> bytes:
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


async def _events(
    request: Request,
    entry: ModelEntry,
    work: GenerateWork,
    token: CancelToken,
    admission: Admission,
    choices: Choices,
    reply: Reply,
) -> AsyncGenerator[bytes, None]:
    """Chunks as the steps come, then ``[DONE]``; a failure after the stream started is an
    ``error`` data event. A client that leaves stops the generation (the response closes this
    generator, which closes the executor's)."""
    request_id = request_id_of(request.scope)
    try:
        if reply.chat:
            yield _data(reply.opening_chunk(len(choices.choices)))
        steps = generation(request, entry, work, token, admission)
        async with contextlib.aclosing(steps) as items:
            async for item in items:
                if isinstance(item, GenerateResponse):
                    continue  # the last item: the choices have what they need
                updates = [u for u in choices.add(item) if u.text or u.logprobs or u.finish_reason]
                if updates:
                    yield _data(reply.chunk(updates))
        ended = choices.finish()
        if ended:
            yield _data(reply.chunk(ended))
        if choices.plan.include_usage:
            yield _data(reply.chunk([], choices.usage))
        yield _DONE
    except RequestError as error:
        yield _error(error_json(error, request_id))
    except ClientGone:
        return
    except Exception as exc:
        logger.exception("an OpenAI-style generation failed")
        yield _error(error_json(internal_error(exc), request_id))
    finally:
        token.cancel("disconnect")  # no-op once finished; stops the work if we are cancelled


def _error(envelope: str) -> bytes:
    # hooklab's envelope (one line of JSON), which OpenAI's SDKs raise as an APIError.
    return b"data: " + envelope.encode() + b"\n\n"
