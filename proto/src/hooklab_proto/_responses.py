"""What the tensor routes answer, and the small JSON answers of the service routes.

A tensor route answers JSON unless the request's ``Accept`` names the frames media type:
``{"tensors": {name: {"dtype", "shape", "data"}}, ...fields}`` — the tensors by name and the
result's own fields. As a frame stream (proto/README.md §3-4) the same fields ride in the begin
frame (or, for a stream sent while the work runs, the end frame) and each tensor is one frame.
The ``*Fields`` models are those fields; the server builds them from these models, so the
schema in /openapi.json and what is sent cannot drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ._analysis import ANALYSIS_RESULT
from ._api import (
    OUTPUT_LOGITS,
    OUTPUT_LOSS,
    OUTPUT_OBJECTIVE,
    OUTPUT_RESIDUAL,
    OUTPUT_VALUE,
)
from ._gradients import IG_ATTRIBUTIONS
from ._patching import PATCHING_LOGITS, PATCHING_METRIC, PatchAxis
from ._tensor_values import DtypeCode, JsonTensor


class SchedulerStats(BaseModel):
    """How the request went through the device's scheduler (seconds, and units of work: a
    layer chunk, a patched forward, a step)."""

    queued_s: float = Field(description="waiting for the device before the first unit")
    units_waited: int = Field(description="units of other requests run before this one's first")
    run_s: float = Field(description="running on the device")
    units: int = Field(description="units this request ran")
    gather_s: float | None = Field(
        None, description="merged forwards: waiting for other requests to join the batch"
    )
    co_batched: int | None = Field(None, description="merged forwards: requests in the batch")
    batch_rows: int | None = Field(None, description="merged forwards: prompts in the batch")


class _Scheduled(BaseModel):
    scheduler: SchedulerStats | None = Field(
        None, description="absent where no scheduler ran the work (a weight read)"
    )


# --- forwards: forward, run_with_cache, run_with_hooks -------------------------------------


class ForwardTensors(BaseModel):
    """A forward's tensors: the outputs it was asked for, and (run_with_cache, run_with_hooks
    with ``names``) each activation by hook name, then each gradient as ``{name}_grad``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    __pydantic_extra__: dict[str, JsonTensor] = Field(init=False)  # activations and gradients

    logits: JsonTensor | None = Field(
        None, alias=OUTPUT_LOGITS, description="[batch, pos, d_vocab] (return_type logits|both)"
    )
    loss: JsonTensor | None = Field(
        None,
        alias=OUTPUT_LOSS,
        description="the mean loss, [] (or [batch, pos - 1] with loss_per_token)",
    )
    residual: JsonTensor | None = Field(
        None, alias=OUTPUT_RESIDUAL, description="[batch, pos, d_model], with stop_at_layer"
    )
    value: JsonTensor | None = Field(
        None, alias=OUTPUT_VALUE, description="the logits_graph's result, instead of the logits"
    )
    objective: JsonTensor | None = Field(
        None, alias=OUTPUT_OBJECTIVE, description="[], the scalar a backward pass started from"
    )


class ForwardResult(_Scheduled):
    """``POST /v1/forward`` in JSON."""

    tensors: ForwardTensors


class CacheEntryInfo(BaseModel):
    """One entry of a stored cache, without its bytes."""

    shape: list[int]
    dtype: DtypeCode


class StoredCacheFields(BaseModel):
    """A cache kept on the server (``store``, ``lazy``): its id and, when its activations do
    not come back, its index."""

    cache_id: str | None = Field(None, description="the stored cache (GET /v1/caches/{id})")
    expires_at: float | None = Field(None, description="Unix time after which it is gone")
    entries: dict[str, CacheEntryInfo] | None = Field(
        None, description="each entry's shape and dtype (return_cache false, or lazy)"
    )


class RunResult(StoredCacheFields, ForwardResult):
    """``POST /v1/run_with_cache`` and ``POST /v1/run_with_hooks`` in JSON."""


# --- patching -------------------------------------------------------------------------------


class PatchingTensors(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    metric: JsonTensor | None = Field(
        None,
        alias=PATCHING_METRIC,
        description="the metric per index row, shaped as 'shape' (e.g. [layer, pos]; [rows] "
        "for explicit index rows)",
    )
    logits: JsonTensor | None = Field(
        None,
        alias=PATCHING_LOGITS,
        description="metric kind 'logits': [rows, batch, positions, d_vocab]",
    )


class PatchingFields(BaseModel):
    """A patching sweep's fields beside its tensor."""

    shape: list[int] = Field(description="the metric's shape: the index axes' sizes, or [rows]")
    axes: list[PatchAxis]
    rows: int = Field(description="index rows patched")
    forwards: int = Field(description="forward passes run")
    copies_per_forward: int = Field(description="patched copies batched into one forward")
    backwards: int | None = Field(None, description="backward passes run (method attribution)")
    baselines: list[float] | None = Field(
        None, description="normalize: the clean and corrupted metrics it used"
    )
    positions: list[int] | None = Field(
        None, description="metric kind 'logits': the positions whose logits came back"
    )


class PatchingResult(PatchingFields, _Scheduled):
    """``POST /v1/patching`` in JSON."""

    tensors: PatchingTensors


# --- integrated gradients and analysis ------------------------------------------------------


class IntegratedGradientsTensors(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    attributions: JsonTensor = Field(
        alias=IG_ATTRIBUTIONS, description="shaped as the activation at 'hook'"
    )


class IntegratedGradientsFields(BaseModel):
    hook: str
    steps: int
    value: float = Field(description="the metric at the input")
    baseline_value: float = Field(description="the metric at the baseline")
    convergence_delta: float = Field(
        description="the attributions' sum minus (value - baseline_value)"
    )
    forwards: int


class IntegratedGradientsResult(IntegratedGradientsFields, _Scheduled):
    """``POST /v1/integrated_gradients`` in JSON."""

    tensors: IntegratedGradientsTensors


class AnalysisTensors(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    result: JsonTensor = Field(alias=ANALYSIS_RESULT, description="the method's tensor")


class AnalysisResult(_Scheduled):
    """``POST /v1/analysis`` in JSON."""

    tensors: AnalysisTensors
    labels: list[str] | None = Field(None, description="when the method returns labels")


# --- stored objects and weights ----------------------------------------------------------------


class NamedTensors(_Scheduled):
    """``GET /v1/tensors/{id}`` (one tensor, named by its id) and ``GET /v1/weights/{name}``
    (one, named as asked) in JSON."""

    tensors: dict[str, JsonTensor]


class StoredCacheResult(BaseModel):
    """``GET /v1/caches/{id}`` in JSON: the entries asked for (all by default)."""

    cache_id: str
    tensors: dict[str, JsonTensor]


# --- service routes ----------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    model: str | None = Field(description="the default model (null: none served)")
    models: list[str] | None = Field(None, description="every model served (when ready)")
    reason: str | None = Field(None, description="why not (when not ready)")


class TokenizerFiles(BaseModel):
    files: dict[str, str] = Field(description="file name -> its text (tokenizer.json, …)")
