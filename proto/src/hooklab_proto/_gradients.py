"""Integrated gradients: ``POST /v1/integrated_gradients`` request and response names.

Integrated gradients (Sundararajan et al., 2017) attributes a metric to the entries of one
activation: ``(x - x') * mean over k of grad f(x' + a_k (x - x'))``, from the input's
activation ``x`` to a baseline ``x'`` in ``steps`` points ``a_k = (k - 1/2) / steps`` (the
midpoint rule). For an input span, the activation is ``hook_embed`` and ``positions`` the span:
only those positions move from the baseline to the input; the others keep the input's values.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ._api import ModelName, Timeout, TokenInput
from ._base import Body
from ._metrics import PatchMetric
from ._saes import SaeIds
from ._tensor_values import TensorValue

# Names in an integrated-gradients response: the attributions, shaped as the activation.
IG_ATTRIBUTIONS = "integrated_gradients.attributions"
MAX_IG_STEPS = 4096


class IntegratedGradientsRequest(Body):
    """Integrated gradients of ``metric`` with respect to the activation at ``hook``. The
    baseline is zeros unless ``baseline`` (a tensor shaped as the activation, or broadcasting to
    it) or ``baseline_input`` (tokens whose activation there is the baseline) is given. The
    begin frame carries ``value`` (the metric at the input), ``baseline_value``,
    ``convergence_delta`` (sum of the attributions minus their difference), ``steps`` and
    ``forwards``."""

    model: ModelName = None
    input: TokenInput = Field(description="text or token ids [batch, pos]")
    prepend_bos: bool | None = None
    hook: str = Field(
        "hook_embed", max_length=256, description="an exact hook name: the activation attributed"
    )
    positions: list[int] | None = Field(
        None,
        max_length=MAX_IG_STEPS,
        description="the span interpolated (positions of the activation's pos axis); null: all",
    )
    baseline: TensorValue | None = None
    baseline_input: TokenInput | None = Field(
        None, description="tokens of the input's shape whose activation is the baseline"
    )
    steps: int = Field(50, ge=1, le=MAX_IG_STEPS, description="points on the path")
    metric: PatchMetric = Field(description="the scalar attributed (any kind but 'logits')")
    saes: SaeIds = Field(default_factory=list)
    timeout_s: Timeout = None

    @model_validator(mode="after")
    def _one_baseline(self) -> IntegratedGradientsRequest:
        if self.baseline is not None and self.baseline_input is not None:
            raise ValueError("give 'baseline' or 'baseline_input', not both")
        return self
