"""Analysis where the data is (``POST /v1/analysis``): one of ``ActivationCache``'s analysis
methods run on a stored cache, with the served model as its model — the same implementation the
client runs on a cache it holds (``hooklab_analysis``), so the numbers are the same either way.

The method and its argument names are checked against the method itself; then the method runs
once on ``meta`` tensors (shapes, no values or memory): that finds a bad argument or a missing
activation before any work, and sizes the result, so its memory and response are counted like
any other request's before it runs.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
from hooklab_analysis import ActivationCache

from hooklab_proto import ANALYSIS_RESULT, AnalysisRequest, ErrorCode, SliceRange
from hooklab_server.engine import HookedTransformer

from ..auth import Account
from .cancel import CancelToken
from .context import OpsContext
from .cost import Cost, check_response, response_size, with_slack
from .errors import RequestError
from .run import TensorsResult

# What the analysis code raises for a bad argument or a missing activation: the request's error.
_ARGUMENT_ERRORS = (KeyError, AssertionError, ValueError, IndexError, TypeError)


@dataclass
class AnalysisWork:
    """A validated analysis: the stored cache, the batch rows read, the call; cost known."""

    cache: dict[str, torch.Tensor]
    rows: int | list[int] | None
    method: str
    kwargs: dict[str, Any]
    request: AnalysisRequest
    cost: Cost
    caller: Account
    wants_json: bool
    op: str = "analysis"


def validate_analysis(ctx: OpsContext, request: AnalysisRequest, wants_json: bool) -> AnalysisWork:
    stored = ctx.store.get("cache", request.cache, ctx.caller).value
    assert isinstance(stored, dict)
    method = getattr(ActivationCache, request.method)
    accepted = [name for name in inspect.signature(method).parameters if name != "self"]
    unknown = [name for name in request.args if name not in accepted]
    if unknown:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"{request.method} has no argument {unknown[0]!r}",
            f"its arguments: {', '.join(accepted)}",
        )
    kwargs = {name: _argument(ctx, name, value) for name, value in request.args.items()}
    rows = _rows(request.rows, stored)
    read = sum(value.numel() * value.element_size() for value in stored.values())
    elements, itemsize = _result_size(ctx, stored, rows, request.method, kwargs, read)
    sent, building = response_size(elements, itemsize, wants_json)
    check_response(sent, wants_json, ctx.settings)
    # The result, a few intermediates of its size, and the rows read (a list copies them).
    peak = 3 * elements * itemsize + building + (read if isinstance(rows, list) else 0)
    cost = Cost(0, 0, with_slack(peak), sent)
    return AnalysisWork(stored, rows, request.method, kwargs, request, cost, ctx.caller, wants_json)


def _result_size(
    ctx: OpsContext,
    stored: dict[str, torch.Tensor],
    rows: int | list[int] | None,
    method: str,
    kwargs: dict[str, Any],
    read: int,
) -> tuple[int, int]:
    """(elements, bytes per element) of the result, from a run on ``meta`` tensors — which
    raises the request's error for a bad argument or shapes that do not fit. An operation with
    no meta kernel leaves the size unknown: then the cache's own size stands for it."""
    on_meta = {name: _meta(value) for name, value in stored.items()}
    meta_kwargs = {name: _meta(value) for name, value in kwargs.items()}
    try:
        result = _call(_view(on_meta, rows), _OnMeta(ctx.model), method, meta_kwargs, rows)
    except NotImplementedError:
        return read // 4, 4
    except RuntimeError as exc:
        if "meta" in str(exc):  # a value read (.item()) that a meta tensor does not have
            return read // 4, 4
        # Shapes that do not fit (a cache of another model …).
        raise RequestError(ErrorCode.VALIDATION, f"RuntimeError: {exc}"[:1000]) from None
    tensor = result[0] if isinstance(result, tuple) else result
    if not isinstance(tensor, torch.Tensor):
        return 0, 4
    return math.prod(tensor.shape), tensor.element_size()


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def analysis_steps(
    ctx: OpsContext, work: AnalysisWork, token: CancelToken
) -> Generator[None, None, TensorsResult]:
    token.check()
    result = _call(_view(work.cache, work.rows), ctx.model, work.method, work.kwargs, work.rows)
    ctx.metrics.add("work_units", op=work.op)
    if isinstance(result, tuple):
        tensor, labels = result
        return TensorsResult({ANALYSIS_RESULT: tensor.cpu()}, {"labels": list(labels)})
    return TensorsResult({ANALYSIS_RESULT: result.cpu()}, {})
    yield  # a generator of one unit: the work runs at the first next()


def _call(
    cache: dict[str, torch.Tensor],
    model: Any,
    method: str,
    kwargs: dict[str, Any],
    rows: int | list[int] | None,
) -> Any:
    analysed = ActivationCache(cache, model, has_batch_dim=not isinstance(rows, int))
    try:
        return getattr(analysed, method)(**kwargs)
    except _ARGUMENT_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise RequestError(
            ErrorCode.VALIDATION, f"{type(exc).__name__}: {message}"[:1000]
        ) from None


def _argument(ctx: OpsContext, name: str, value: Any) -> Any:
    """A wire argument as the method takes it: a slice range back to a tuple slice, a tensor
    decoded (floats checked finite)."""
    if isinstance(value, SliceRange):
        return slice(value.start, value.stop, value.step)
    if isinstance(value, bool | int | float | str | list) or value is None:
        return value
    return ctx.finite_tensor(value, f"argument {name!r}")


def _rows(rows: int | list[int] | None, cache: dict[str, torch.Tensor]) -> int | list[int] | None:
    if rows is None:
        return None
    sizes = Counter(value.shape[0] for value in cache.values() if value.dim() > 0)
    size = sizes.most_common(1)[0][0] if sizes else 0
    bad = [row for row in ([rows] if isinstance(rows, int) else rows) if not -size <= row < size]
    if bad:
        raise RequestError(ErrorCode.BAD_INDEX, f"row {bad[0]} is outside 0..{size - 1}")
    return rows


def _view(cache: dict[str, torch.Tensor], rows: int | list[int] | None) -> dict[str, torch.Tensor]:
    if rows is None:
        return dict(cache)
    return {name: value[rows] for name, value in cache.items()}


class _OnMeta:
    """The served model with every tensor it hands out on the ``meta`` device (shapes only):
    what the analysis code reads of its model, for a dry run that allocates nothing."""

    def __init__(self, model: HookedTransformer) -> None:
        self._model = model
        self.cfg = _MetaConfig(model.cfg)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if isinstance(value, torch.Tensor):
            return value.to("meta")
        if callable(value):
            return _on_meta(value)
        return value


class _MetaConfig:
    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg
        self.device = torch.device("meta")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


def _on_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        value = fn(*args, **kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    return call
