"""Running validated work from a route: through the executor, stopped when the client leaves or
the deadline passes, and every failure answered as a JSON error (never a bare 500 page)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from hooklab_proto import GenerateResponse, GenerateStep

from ..models import ModelEntry
from ..ops import (
    Cancelled,
    CancelToken,
    CaptureStream,
    GenerateWork,
    QuotaExceeded,
    RequestError,
    TensorsResult,
    Work,
    deadline_error,
)
from ..quotas import Admission
from ..tensor_frames import StreamedTensors
from .bodies import wants_json
from .edge import account_of, note_tokens, request_id_of
from .errors import ClientGone, error_response, internal_error
from .state import service

logger = logging.getLogger("hooklab_server")


def cancel_token(request: Request, timeout_s: float | None) -> CancelToken:
    settings = service(request).settings
    wanted = settings.request_timeout_s if timeout_s is None else timeout_s
    return CancelToken(min(wanted, settings.max_timeout_s))


async def validate(request: Request, entry: ModelEntry, body: Any) -> Work:
    """Validate a parsed body into the caller's work on the model, off the event loop."""
    validate = entry.operations.validate
    return await run_in_threadpool(validate, body, account_of(request.scope), wants_json(request))


async def admit(request: Request, work: Work) -> Admission:
    """Hold one of the caller's running slots and charge the work's tokens (429 if over).
    The edge releases the slot when the request ends, should the route not get to it."""
    quotas, caller = service(request).quotas, account_of(request.scope)
    # Off the event loop: scaled out, the counts live in Redis.
    admission = await run_in_threadpool(quotas.admit, caller, work.cost.tokens)
    request.scope["state"]["admission"] = admission
    return admission


def settle(request: Request, work: Work, admission: Admission, tokens: int) -> None:
    """Free the slot and count the tokens the work really ran."""
    admission.settle(tokens)
    admission.release()
    note_tokens(request.scope, tokens)
    service(request).metrics.add("tokens", tokens, key=account_of(request.scope).name, op=work.op)


async def _watch_disconnect(request: Request, token: CancelToken) -> None:
    # The body is consumed, so the next message the server gives is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            token.cancel("disconnect")
            return


def _stopped(reason: str, token: CancelToken) -> Exception:
    """What to raise for work stopped early (the executor counted it): 504 past the deadline,
    nothing to answer when the client left."""
    return deadline_error(token) if reason == "deadline" else ClientGone()


async def run(
    request: Request, entry: ModelEntry, work: Work, token: CancelToken
) -> TensorsResult | StreamedTensors | CaptureStream:
    """Run a forward or sweep; 504 past the deadline, ClientGone when the client left."""
    assert not isinstance(work, GenerateWork)
    admission = await admit(request, work)
    watcher = asyncio.create_task(_watch_disconnect(request, token))
    try:
        # The work checks the token between layers, steps and chunks, so this returns soon
        # after a disconnect or the deadline.
        key = account_of(request.scope).name
        result = await entry.executor.run(work, token, key)
    except BaseException as failure:
        settle(request, work, admission, work.cost.tokens)
        if isinstance(failure, Cancelled):
            raise _stopped(failure.reason, token) from None
        raise
    finally:
        watcher.cancel()  # a streamed response watches for the client leaving itself
    if isinstance(result, CaptureStream):  # still running: its slot is held until it ends
        result.on_close(lambda: settle(request, work, admission, work.cost.tokens))
    else:
        settle(request, work, admission, work.cost.tokens)
    return result


async def generation(
    request: Request,
    entry: ModelEntry,
    work: GenerateWork,
    token: CancelToken,
    admission: Admission,
) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
    """A generation's steps then its response (``admission`` made by the route, before any
    response started)."""
    steps = entry.executor.generate(work, token, account_of(request.scope).name)
    finished = False
    made = 0
    try:
        async for item in steps:
            finished = isinstance(item, GenerateResponse)
            made += not finished
            yield item
    except Cancelled as stop:
        raise _stopped(stop.reason, token) from None
    except (asyncio.CancelledError, GeneratorExit):
        if not finished:  # the streaming client left between two steps: stop the work
            token.cancel("disconnect")
        raise
    finally:
        await steps.aclose()
        prompt = work.prompt
        settle(request, work, admission, prompt.batch * (prompt.pos + made))


async def collect_generation(
    request: Request,
    entry: ModelEntry,
    work: GenerateWork,
    token: CancelToken,
    admission: Admission,
    on_step: Callable[[GenerateStep], None] | None = None,
) -> GenerateResponse:
    """The generation's response; ``on_step`` sees each step on the way."""
    watcher = asyncio.create_task(_watch_disconnect(request, token))
    try:
        # Closed on the way out, so the tokens are settled and the slot freed before the
        # response goes (not whenever the generator is collected).
        steps = generation(request, entry, work, token, admission)
        async with contextlib.aclosing(steps) as items:
            async for item in items:
                if isinstance(item, GenerateResponse):
                    return item
                if on_step is not None:
                    on_step(item)
        raise AssertionError("a generation ends with its response")
    finally:
        watcher.cancel()


class HooklabRoute(APIRoute):
    """Every error a route raises becomes the JSON error envelope here, keeping the keep-alive
    connection (Starlette re-raises unhandled errors into the server, which drops it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as error:
                metrics = service(request).metrics
                metrics.add("rejected", code=str(error.code))
                if isinstance(error, QuotaExceeded):
                    key = account_of(request.scope).name
                    metrics.add("quota_refusals", key=key, quota=error.quota)
                return error_response(error, request_id_of(request.scope))
            except ClientGone:
                raise
            except Exception as exc:
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                service(request).metrics.add("rejected", code="internal")
                return error_response(internal_error(exc), request_id_of(request.scope))

        return route
