"""The edge of every HTTP request, as one pure-ASGI middleware: a request id, the allowed-hosts
check (DNS rebinding), a write timeout for readers that stall, one log line for a client that
left, and the request counter."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hooklab_proto import ErrorCode

from ..auth import Account, KeyRing
from ..metrics import Metrics
from ..ops import RequestError
from .errors import ClientGone, error_response

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


# Routes anyone may call when keys are configured: probes, metrics, the API's description, and
# the teaching page with its files (the page asks for a key itself).
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v1/capabilities", "/"}
)
OPEN_PREFIXES = ("/ui/",)
access_log = logging.getLogger("hooklab_server.access")


def account_of(scope: Scope) -> Account:
    account: Account = scope["state"]["account"]
    return account


def note_tokens(scope: Scope, tokens: int) -> None:
    """Record the tokens a request ran, for its access-log line."""
    scope["state"]["tokens"] = scope["state"].get("tokens", 0) + tokens


class EdgeMiddleware:
    """Every HTTP request passes here first: it gets an id; a wrong Host or a missing or unknown
    key is refused before any route runs; the response is timed, counted per key name and
    logged as one access line; a stalled reader or a client that left ends it quietly."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        keys: KeyRing,
        allowed_hosts: tuple[str, ...],
        write_timeout_s: float,
        route_templates: Iterable[str],
    ) -> None:
        self.app = app
        self.templates = {template: route_pattern(template) for template in route_templates}
        self.metrics = metrics
        self.keys = keys
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {host.strip("[]").lower() for host in allowed_hosts}
        self.write_timeout_s = write_timeout_s

    def _gate(self, scope: Scope) -> RequestError | Account:
        """The request's account, or why it is refused."""
        host = _host_name(_header(scope, b"host") or "").lower()
        if not self.any_host and host not in self.allowed_hosts:
            return RequestError(
                ErrorCode.BAD_HOST,
                f"this server does not answer to the host {host[:100]!r}",
                "the operator lists the host names clients use with --allowed-hosts",
            )
        if not self.keys.enabled:
            return self.keys.open_account()
        scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
        account = self.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if account is not None:
            return account
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return Account("anonymous")
        said = "no API key was sent" if not key else "the API key is not one of this server's"
        return RequestError(
            ErrorCode.UNAUTHORIZED,
            said,
            "send 'Authorization: Bearer <key>' (the client: from_server(url, api_key=…) or "
            "HOOKLAB_API_KEY); the server's operator makes keys with 'hooklab-server keys add'",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # The callback socket: the same host and key checks, before it is accepted.
            gate = self._gate(scope)
            if isinstance(gate, RequestError):
                await send({"type": "websocket.close", "code": 1008, "reason": gate.message[:120]})
                return
            scope.setdefault("state", {})["account"] = gate
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _GIVEN_ID.match(given) else secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        request_id_var.set(request_id)
        status: list[int] = []
        sent = [0]

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
            sent[0] += len(message.get("body", b""))

        gate = self._gate(scope)
        state["account"] = gate if isinstance(gate, Account) else Account("anonymous")
        try:
            if isinstance(gate, RequestError):
                await error_response(gate, request_id)(scope, receive, send_with_timeout)
                return
            await self.app(scope, receive, send_with_timeout)
        except (SlowReader, ClientGone, BaseExceptionGroup) as exc:
            # Ends the response early; uvicorn then closes the connection. The access line
            # says so: one line, no trace.
            cause = _single(exc)
            if isinstance(cause, SlowReader):
                abort = scope.get("extensions", {}).get("hooklab.abort")
                if abort is not None:  # drop the unread bytes now, not after they drain
                    abort()
                self.metrics.add("write_timeouts")
                state["ended"] = f"reader_stalled_{self.write_timeout_s:g}s"
            elif isinstance(cause, ClientGone):
                self.metrics.add("client_disconnects")
                state["ended"] = "client_left"
            else:
                raise
        finally:
            admission = state.get("admission")
            if admission is not None:  # a route that never started its work (client gone)
                admission.release()
            self._account_for(scope, status[0] if status else 499, sent[0], started)

    def _account_for(self, scope: Scope, status: int, sent: int, started: float) -> None:
        """Metrics and the access-log line of one finished request."""
        seconds = time.perf_counter() - started
        route, key = _route_label(scope, self.templates), account_of(scope).name
        self.metrics.add("requests", route=route, status=str(status), key=key)
        self.metrics.observe("request_seconds", seconds, route=route)
        self.metrics.add("response_bytes", sent, key=key)
        state = scope["state"]
        access_log.info(
            "key=%s method=%s route=%s status=%d tokens=%d bytes=%d ms=%.1f id=%s%s",
            key, scope["method"], route, status, state.get("tokens", 0), sent, seconds * 1000,
            state["request_id"], f" ended={state['ended']}" if "ended" in state else "",
        )  # fmt: skip


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def route_pattern(template: str) -> re.Pattern[str]:
    """A path template ("/v1/tensors/{object_id}", "/v1/weights/{name:path}") as a regex."""
    pattern = re.sub(r"\{[^}:]+:path\}", ".+", template)
    pattern = re.sub(r"\{[^}]+\}", "[^/]+", pattern)
    return re.compile(f"^{pattern}$")


def _route_label(scope: Scope, templates: dict[str, re.Pattern[str]]) -> str:
    """The route's path template (bounded label values) — also for requests refused before
    routing — or 'unmatched'."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    found = (t for t, pattern in templates.items() if pattern.match(scope.get("path", "")))
    return next(found, "unmatched")
