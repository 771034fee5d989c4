"""Client callbacks: placeholder until the callback channel lands."""

from __future__ import annotations

from hooklab_proto import CallbackSpec, ErrorCode

from ..engine.hook_points import HookFn
from .context import OpsContext
from .errors import RequestError


def callback_hook(ctx: OpsContext, spec: CallbackSpec, name: str) -> HookFn:
    raise RequestError(ErrorCode.VALIDATION, "callbacks are not available on this server")
