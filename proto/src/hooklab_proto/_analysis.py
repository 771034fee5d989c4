"""Analysis where the data is: ``POST /v1/analysis`` runs one of ``ActivationCache``'s analysis
methods on a stored cache and answers only its result.

The arguments are the method's own, by TransformerLens name. A TransformerLens slice argument
(``pos_slice``, ``neuron_slice``, ``batch_slice``) keeps its meaning across the wire: an int,
a list of indices, a tensor, or ``{"start", "stop", "step"}`` for a tuple (``(1, 5)`` is 1:5 —
unlike the list ``[1, 5]``, which picks two indices). The cache is read as the client sees it:
``rows`` selects batch rows first (an int drops the batch axis, as ``remove_batch_dim`` or
``apply_slice_to_batch_dim(i)`` did).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from ._api import ModelName, Timeout
from ._base import Body
from ._forms import one_of
from ._limits import bounded_length
from ._tensor_values import TensorValue

AnalysisMethod = Literal[
    "accumulated_resid", "decompose_resid", "stack_head_results", "stack_activation",
    "get_neuron_results", "stack_neuron_results", "apply_ln_to_stack", "logit_attrs",
    "get_full_resid_decomposition",
]  # fmt: skip
# The methods that run on the server (compute_head_results adds entries instead: it runs on
# the client).
ANALYSIS_METHODS: tuple[str, ...] = get_args(AnalysisMethod)

ANALYSIS_RESULT = "analysis.result"  # the method's tensor; its labels are the begin frame's


class SliceRange(Body):
    """A Python slice ``start:stop:step`` (a TransformerLens tuple slice argument)."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None


# A list of ints stays a list of indices; other lists are tensors (plain arrays).
AnalysisArg = Annotated[
    bool | int | float | str | SliceRange | list[int] | TensorValue | None,
    Field(union_mode="left_to_right"),
]


class AnalysisRequest(Body):
    model: ModelName = None
    cache: str = Field(min_length=1, max_length=128, description="a stored cache's id")
    method: AnalysisMethod
    args: Annotated[dict[str, AnalysisArg], bounded_length("max_names", "arguments")] = Field(
        default_factory=dict, description="the method's arguments by name"
    )
    rows: Annotated[
        int | Annotated[list[int], bounded_length("max_batch", "rows")] | None,
        one_of("a batch row (0), a list of rows ([0, 2]), or null"),
    ] = Field(None, description="batch rows read (an int drops the batch axis); null: all")
    timeout_s: Timeout = None
