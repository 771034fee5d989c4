"""uvicorn with hooklab's edge limits: a connection must send its headers within
``header_timeout_s`` (uvicorn itself only times out idle keep-alive connections), idle
keep-alive connections close after ``keep_alive_s``, past ``max_connections`` new requests get
503, and a response the client stopped reading can be dropped at once (the ``hooklab.abort``
ASGI extension: a graceful close would wait for the unread bytes to drain)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings

ABORT_EXTENSION = "hooklab.abort"


class EdgeProtocol(HttpToolsProtocol):
    """httptools' protocol, closing connections whose request headers do not arrive in time
    (half-sent headers would otherwise hold a connection for ever), and offering each request
    a way to drop its connection without draining."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope.setdefault("extensions", {})[ABORT_EXTENSION] = self.transport.abort  # type: ignore[assignment]
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration for ``app`` under ``settings`` (host and port from them
    unless overridden, e.g. by tests binding a socket of their own)."""
    protocol = type(
        "HooklabHTTPProtocol",
        (EdgeProtocol,),
        {"header_timeout_s": settings.header_timeout_s},
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "log_level": "info",
        "access_log": False,  # hooklab's own access line (api/edge.py) says more, once
        **overrides,
    }
    return uvicorn.Config(app, **options)
