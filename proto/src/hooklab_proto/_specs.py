"""Hook specs: declarative interventions a request asks the server to apply at hook points.

Each spec names a hook point (exact, or a glob such as ``blocks.*.hook_resid_post``), an
operation and optional index selectors. Selectors pick, on the activation's axes, the batch rows
(``batch``), positions (``pos``; the query position for attention patterns), heads (``head``) and
last-axis features (``neuron``: MLP neurons, residual dimensions, …). Omitted selectors mean all.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ._base import Body
from ._forms import one_of
from ._graph import CallbackSpec, GraphSpec
from ._limits import bounded_length
from ._tensor_values import TensorValue

Indices = Annotated[
    int | list[int] | None, bounded_length("max_selector_length", "selector indices")
]


class _Spec(Body):
    hook: str = Field(min_length=1, max_length=256, description="hook name or glob pattern")
    batch: Indices = None
    pos: Indices = None
    head: Indices = None
    neuron: Indices = None


class AblateSpec(_Spec):
    """Replace the selection by zero, by its mean, or by another batch row's value."""

    op: Literal["ablate"] = "ablate"
    mode: Literal["zero", "mean", "resample"] = "zero"
    mean_over: Literal["batch", "pos"] = Field(
        "batch", description="mode=mean: average over the batch (default) or over positions"
    )
    source_batch: Annotated[
        list[int] | None, bounded_length("max_batch", "source rows")
    ] = Field(
        None, description="mode=resample: for each batch row, the row whose value replaces it "
        "(default: the next row, cyclically)",
    )  # fmt: skip


class CacheSource(Body):
    cache: str = Field(min_length=1, max_length=128, description="a stored cache id")


class TensorSource(Body):
    tensor: TensorValue


class BatchSource(Body):
    batch: int = Field(ge=0, description="a row of this request's batch (another prompt)")


class PatchSpec(_Spec):
    """Overwrite the selection with the same hook's value from a stored cache, an inline tensor
    (shaped like the activation or the selection), or another prompt of this request."""

    op: Literal["patch"] = "patch"
    source: CacheSource | TensorSource | BatchSource


class SteerSpec(_Spec):
    """Add ``coeff * vector`` (vector: the activation's last axis, or the selection's shape)."""

    op: Literal["steer"] = "steer"
    vector: TensorValue
    coeff: float = 1.0


class ScaleSpec(_Spec):
    op: Literal["scale"] = "scale"
    factor: float


class ClampSpec(_Spec):
    op: Literal["clamp"] = "clamp"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ClampSpec:
        if self.min is None and self.max is None:
            raise ValueError("clamp needs 'min', 'max' or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clamp min {self.min} is above max {self.max}")
        return self


class SetSpec(_Spec):
    """Set the selection to a number, or to a tensor broadcastable to the selection."""

    op: Literal["set"] = "set"
    value: float | TensorValue


class ProjectOutSpec(_Spec):
    """Remove the component along ``direction`` (the activation's last axis): directional
    ablation, ``x - (x·d̂) d̂``."""

    op: Literal["project_out"] = "project_out"
    direction: TensorValue


Features = Annotated[int | list[int], bounded_length("max_selector_length", "features")]


class _FeatureSpec(Body):
    """An edit of a sparse autoencoder's features (``GET /v1/model``: ``cfg.sae_widths``).
    ``hook`` is the hook point the SAE reads (e.g. ``blocks.3.hook_resid_post``), exactly;
    ``feature`` one feature index or several; ``batch`` and ``pos`` select as in other specs."""

    hook: str = Field(min_length=1, max_length=256, description="the hook point an SAE reads")
    feature: Features
    batch: Indices = None
    pos: Indices = None


class FeatureSteerSpec(_FeatureSpec):
    """Add ``coeff * W_dec[feature]`` (each feature's decoder row) at the hook point: steering
    by a feature, as adding ``coeff`` to its activation does through the error term."""

    op: Literal["feature_steer"] = "feature_steer"
    coeff: float = 1.0


class FeatureAblateSpec(_FeatureSpec):
    """Zero the features' activations (``hook_sae_acts_post``); the host point moves by
    ``-act * W_dec[feature]``, the error term kept."""

    op: Literal["feature_ablate"] = "feature_ablate"


class FeatureClampSpec(_FeatureSpec):
    """Set the features' activations (``hook_sae_acts_post``) to ``value``."""

    op: Literal["feature_clamp"] = "feature_clamp"
    value: float


FeatureSpec = FeatureSteerSpec | FeatureAblateSpec | FeatureClampSpec

DeclarativeSpec = (
    AblateSpec | PatchSpec | SteerSpec | ScaleSpec | ClampSpec | SetSpec | ProjectOutSpec
)

_OP_SPECS = (
    AblateSpec, PatchSpec, SteerSpec, ScaleSpec, ClampSpec, SetSpec, ProjectOutSpec,
    FeatureSteerSpec, FeatureAblateSpec, FeatureClampSpec,
)  # fmt: skip
SPEC_OPS: tuple[str, ...] = tuple(spec.model_fields["op"].default for spec in _OP_SPECS)

# Beside the declarative ops: Python hook functions, traced into graphs or called back.
HookSpec = Annotated[
    DeclarativeSpec | FeatureSpec | GraphSpec | CallbackSpec,
    Field(discriminator="op"),
    one_of(
        'a hook spec {"hook": "blocks.0.hook_resid_pre", "op": "ablate"} whose op is one of '
        + ", ".join([*SPEC_OPS, "graph", "callback"])
    ),
]

# Operations that replace values; two of them on the same hook point conflict.
REPLACING_OPS = frozenset({"ablate", "patch", "set"})
