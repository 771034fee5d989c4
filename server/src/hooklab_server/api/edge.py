"""The edge of every HTTP request, as one pure-ASGI middleware: a request id, the allowed-hosts
check (DNS rebinding), a write timeout for readers that stall, one log line for a client that
left, and the request counter."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hooklab_proto import ErrorCode

from ..metrics import Metrics
from ..ops import RequestError
from .errors import ClientGone, error_response

logger = logging.getLogger("hooklab_server")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hooklab_request_id", default=None
)
_GIVEN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdFilter(logging.Filter):
    """Gives every log record the id of the request it was logged for (``-`` outside one);
    uvicorn's access log runs in the request's task, so its lines get the id too."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


class SlowReader(Exception):
    """The client stopped reading the response for longer than the write timeout."""


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(header: str) -> str:
    """The host of a Host header, without its port (IPv6 literals keep their brackets off)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, allowed_hosts: tuple[str, ...], write_timeout_s: float
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {host.strip("[]").lower() for host in allowed_hosts}
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _GIVEN_ID.match(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(request_id)
        status: list[int] = []

        async def send_with_timeout(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), self.write_timeout_s)
            except TimeoutError:
                raise SlowReader from None

        try:
            host = _host_name(_header(scope, b"host") or "").lower()
            if not self.any_host and host not in self.allowed_hosts:
                error = RequestError(
                    ErrorCode.BAD_HOST,
                    f"this server does not answer to the host {host[:100]!r}",
                    "the operator lists the host names clients use with --allowed-hosts",
                )
                await error_response(error, request_id)(scope, receive, send_with_timeout)
                return
            await self.app(scope, receive, send_with_timeout)
        except (SlowReader, ClientGone, BaseExceptionGroup) as exc:
            # Ends the response early; uvicorn then closes the connection. One line, no trace.
            cause = _single(exc)
            where = f"{scope['method']} {scope['path']}"
            if isinstance(cause, SlowReader):
                abort = scope.get("extensions", {}).get("hooklab.abort")
                if abort is not None:  # drop the unread bytes now, not after they drain
                    abort()
                self.metrics.add("write_timeouts")
                logger.info(
                    "%s: closed, the client read nothing for %.0f s", where, self.write_timeout_s
                )
            elif isinstance(cause, ClientGone):
                self.metrics.add("client_disconnects")
                logger.info("%s: the client left", where)
            else:
                raise
        finally:
            self.metrics.add(
                "requests", route=_route_label(scope), status=str(status[0]) if status else "499"
            )


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _route_label(scope: Scope) -> str:
    """The route's path template (bounded label values), or 'unmatched'."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
