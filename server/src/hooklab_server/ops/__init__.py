"""Operations on the engine, independent of HTTP: validate a request once into typed work with a
cost, then execute it (on the executor's thread) with a cancellation token.

    work = operations.validate(request, wants_json=False)   # RequestError when invalid
    result = operations.execute(work, token)                # Cancelled when stopped early
"""

from __future__ import annotations

from typing import Any

import torch

from hooklab_proto import ForwardRequest, GenerateRequest, PatchingRequest

from ..auth import Account
from .cancel import Cancelled, CancelToken, deadline_error
from .context import OpsContext
from .errors import QuotaExceeded, RequestError, too_large
from .generate import GenerateWork, Generation, validate_generation
from .patching import PatchingWork, run_patching, validate_patching
from .run import ForwardWork, TensorsResult, run_forward, validate_forward

Work = ForwardWork | GenerateWork | PatchingWork


class Operations:
    """The validate / execute pair every route goes through, over one shared model."""

    def __init__(self, ctx: OpsContext) -> None:
        self.ctx = ctx

    def validate(self, request: Any, caller: Account, wants_json: bool = False) -> Work:
        ctx = self.ctx.as_caller(caller)
        if isinstance(request, ForwardRequest):
            return validate_forward(ctx, request, wants_json)
        if isinstance(request, GenerateRequest):
            return validate_generation(ctx, request)
        if isinstance(request, PatchingRequest):
            return validate_patching(ctx, request, wants_json)
        raise TypeError(f"no operation validates {type(request).__name__}")

    def execute(self, work: ForwardWork | PatchingWork, token: CancelToken) -> TensorsResult:
        """Run a validated forward or sweep to its end (raises Cancelled when stopped)."""
        token.check()
        with torch.inference_mode():
            if isinstance(work, ForwardWork):
                return run_forward(self.ctx, work, token)
            return run_patching(self.ctx, work, token)

    def start_generation(self, work: GenerateWork, token: CancelToken) -> Generation:
        token.check()
        return Generation(self.ctx, work, token)


__all__ = [
    "CancelToken",
    "Cancelled",
    "ForwardWork",
    "GenerateWork",
    "Generation",
    "Operations",
    "OpsContext",
    "PatchingWork",
    "QuotaExceeded",
    "RequestError",
    "TensorsResult",
    "Work",
    "deadline_error",
    "too_large",
]
