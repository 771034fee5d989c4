"""Operations on the engine, independent of HTTP: validate a request once into typed work with a
cost, then run it (on the executor's thread) a unit at a time, with a cancellation token.

    work = operations.validate(request, caller)      # RequestError when invalid
    steps = operations.steps(work, token)            # a generator: one unit of work per next()
    result = drive(steps)                             # Cancelled when stopped early

A unit is one forward (a forward request, one chunk of a patching sweep, one chunk of
integrated-gradient steps with its backward) or one generation step;
a generation yields its GenerateStep items, the others yield None, and the generator returns the
result (TensorsResult, or GenerateResponse).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import torch

from hooklab_proto import (
    AnalysisRequest,
    ForwardRequest,
    GenerateRequest,
    GenerateResponse,
    GenerateStep,
    IntegratedGradientsRequest,
    PatchingRequest,
)

from ..auth import Account
from .analysis import AnalysisWork, analysis_steps, validate_analysis
from .cancel import Cancelled, CancelToken, deadline_error, failure_error
from .capture_stream import CaptureStream, streams_captures
from .context import OpsContext
from .errors import QuotaExceeded, RequestError, too_large
from .generate import GenerateWork, Generation, validate_generation
from .integrated_gradients import (
    IntegratedGradientsWork,
    integrated_gradients_steps,
    validate_integrated_gradients,
)
from .patching import PatchingWork, patching_steps, validate_patching
from .run import (
    ForwardWork,
    TensorsResult,
    capture_on_the_wire,
    run_forward,
    validate_forward,
)
from .uploaded_saes import context_of, with_saes

# Work whose result is tensors.
TensorWork = ForwardWork | PatchingWork | IntegratedGradientsWork | AnalysisWork
Work = TensorWork | GenerateWork
Steps = Generator[GenerateStep | None, None, TensorsResult | GenerateResponse]
Result = TypeVar("Result")


def drive(steps: Generator[Any, None, Result]) -> Result:
    """Run every unit of a steps generator; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class Operations:
    """The validate / execute pair every route goes through, over one shared model."""

    def __init__(self, ctx: OpsContext) -> None:
        self.ctx = ctx

    def validate(self, request: Any, caller: Account, wants_json: bool = False) -> Work:
        ctx = self.ctx.as_caller(caller)
        if isinstance(request, ForwardRequest | GenerateRequest | IntegratedGradientsRequest):
            # Uploaded SAEs: validated and run on a view of the model (uploaded_saes.py).
            ctx = with_saes(ctx, request.saes)
            work = self._validate_viewed(ctx, request, wants_json)
            if ctx.model is not self.ctx.model:
                work.model = ctx.model
            return work
        if isinstance(request, PatchingRequest):
            return validate_patching(ctx, request, wants_json)
        if isinstance(request, AnalysisRequest):
            return validate_analysis(ctx, request, wants_json)
        raise TypeError(f"no operation validates {type(request).__name__}")

    @staticmethod
    def _validate_viewed(
        ctx: OpsContext,
        request: ForwardRequest | GenerateRequest | IntegratedGradientsRequest,
        wants_json: bool,
    ) -> ForwardWork | GenerateWork | IntegratedGradientsWork:
        if isinstance(request, ForwardRequest):
            return validate_forward(ctx, request, wants_json)
        if isinstance(request, GenerateRequest):
            return validate_generation(ctx, request)
        return validate_integrated_gradients(ctx, request, wants_json)

    def steps(self, work: Work, token: CancelToken) -> Steps:
        """The work as units (see the module's docstring); each unit checks ``token`` first and
        runs under inference mode."""
        ctx = context_of(self.ctx, work)
        if isinstance(work, ForwardWork):
            inner: Steps = _one_unit(run_forward, ctx, work, token)
        elif isinstance(work, PatchingWork):
            inner = patching_steps(ctx, work, token)
        elif isinstance(work, IntegratedGradientsWork):
            inner = integrated_gradients_steps(ctx, work, token)
        elif isinstance(work, AnalysisWork):
            inner = analysis_steps(ctx, work, token)
        else:
            inner = _generation_steps(ctx, work, token)
        return _in_inference_mode(inner, token)


def _one_unit(run: Any, ctx: OpsContext, work: Work, token: CancelToken) -> Steps:
    result: TensorsResult = run(ctx, work, token)
    return result
    yield  # a generator of one unit: the work runs at the first next()


def _generation_steps(ctx: OpsContext, work: GenerateWork, token: CancelToken) -> Steps:
    generation = Generation(ctx, work, token)
    try:
        yield from generation
        return generation.response()
    finally:
        generation.close()


def _in_inference_mode(inner: Steps, token: CancelToken) -> Steps:
    """Each unit of ``inner`` under inference mode, after a cancellation check (the mode is
    thread-local state, so it is entered per unit, on whichever thread runs it)."""
    try:
        while True:
            token.check()
            with torch.inference_mode():
                try:
                    item = next(inner)
                except StopIteration as done:
                    return done.value
            yield item
    finally:
        inner.close()  # a generation stopped early frees its KV cache now


__all__ = [
    "AnalysisWork",
    "CancelToken",
    "Cancelled",
    "CaptureStream",
    "ForwardWork",
    "GenerateWork",
    "Generation",
    "IntegratedGradientsWork",
    "Operations",
    "OpsContext",
    "PatchingWork",
    "QuotaExceeded",
    "RequestError",
    "Steps",
    "TensorWork",
    "TensorsResult",
    "Work",
    "capture_on_the_wire",
    "context_of",
    "deadline_error",
    "drive",
    "failure_error",
    "streams_captures",
    "too_large",
]
