"""Client callbacks (placeholder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._transport import Transport


class CallbackSession:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def register(self, fn: Callable[..., Any], hook_name: str) -> dict[str, Any]:
        raise TypeError(f"callbacks are not available yet ({hook_name})")
