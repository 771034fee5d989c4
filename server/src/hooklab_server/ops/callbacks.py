"""Callback hook entries: the hook function runs on the client, the forward waits for it."""

from __future__ import annotations

import secrets

import torch

from hooklab_proto import CallbackSpec, ErrorCode

from ..callbacks import call_message, replied_tensor
from .context import OpsContext
from .errors import RequestError


class ClientCallback:
    """A hook that sends the activation to the client's function and continues with what comes
    back; a forward holding one runs in the scheduler's slow lane, never merged."""

    def __init__(self, ctx: OpsContext, spec: CallbackSpec, name: str) -> None:
        relay = ctx.callbacks
        if relay is None:
            raise RequestError(
                ErrorCode.VALIDATION,
                "this server takes no client callbacks",
                "use hook functions that trace (tensor operations only), or hook specs",
            )
        relay.check(spec.session, ctx.caller.name)
        self.relay = relay
        self.session = spec.session
        self.callback = spec.callback
        self.name = name
        self.timeout_s = min(spec.timeout_s, ctx.settings.callback_timeout_s)

    def __call__(self, x: torch.Tensor, hook: object = None) -> torch.Tensor | None:
        call_id = secrets.token_hex(8)
        message = call_message(call_id, self.callback, self.name, x)
        reply = self.relay.call(self.session, message, call_id, self.timeout_s)
        return replied_tensor(reply, x, self.name)
