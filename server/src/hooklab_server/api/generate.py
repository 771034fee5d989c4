"""``POST /v1/generate``: JSON, or server-sent events with ``stream``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request, Response

from hooklab_proto import (
    DoneEvent,
    ErrorEvent,
    ErrorResponse,
    GenerateEvent,
    GenerateRequest,
    GenerateResponse,
    TokenEvent,
)

from ..models import ModelEntry
from ..ops import CancelToken, GenerateWork, RequestError
from ..quotas import Admission
from .bodies import ClosingStream, parse
from .edge import request_id_of
from .errors import ClientGone, error_body, internal_error
from .openapi import request_body, schema_of
from .routes import ERRORS
from .running import (
    HooklabRoute,
    admit,
    cancel_token,
    collect_generation,
    generation,
    validate,
)
from .state import model_entry

logger = logging.getLogger("hooklab_server")
router = APIRouter(route_class=HooklabRoute, responses=ERRORS)


def _error_event(error: RequestError, request_id: str | None) -> bytes:
    envelope = ErrorResponse.model_validate(error_body(error, request_id))
    return GenerateEvent(ErrorEvent(data=envelope)).encoded()


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": schema_of(GenerateEvent)}}},
    tags=["run"],
    openapi_extra=request_body(GenerateRequest),
)
async def generate(request: Request) -> Response | GenerateResponse:
    """TransformerLens ``generate`` with hook specs active at every step. With ``stream`` the
    tokens arrive as server-sent events (``token`` per step, then ``done`` or ``error``);
    closing the connection stops the generation at the next step."""
    body = await parse(request, GenerateRequest)
    token = cancel_token(request, body.timeout_s)  # the deadline covers validation too
    entry = await model_entry(request, body.model)
    work = await validate(request, entry, body)
    assert isinstance(work, GenerateWork)
    admission = await admit(request, work)
    if not body.stream:
        return await collect_generation(request, entry, work, token, admission)
    return ClosingStream(
        _events(request, entry, work, token, admission),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


async def _events(
    request: Request,
    entry: ModelEntry,
    work: GenerateWork,
    token: CancelToken,
    admission: Admission,
) -> AsyncGenerator[bytes, None]:
    """Token events, then ``done``; any failure after the stream started is an ``error``
    event, never a bare close. A client that leaves stops the generation (the response closes
    this generator, which closes the executor's)."""
    request_id = request_id_of(request.scope)
    try:
        steps = generation(request, entry, work, token, admission)
        async with contextlib.aclosing(steps) as items:
            async for item in items:
                event = (
                    DoneEvent(data=item)
                    if isinstance(item, GenerateResponse)
                    else TokenEvent(data=item)
                )
                yield GenerateEvent(event).encoded()
    except RequestError as error:
        yield _error_event(error, request_id)
    except ClientGone:
        return
    except Exception as exc:
        logger.exception("generation failed")
        yield _error_event(internal_error(exc), request_id)
    finally:
        token.cancel("disconnect")  # no-op once finished; stops the work if we are cancelled
