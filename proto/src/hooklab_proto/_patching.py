"""Activation patching: ``POST /v1/patching`` request, metric vocabulary and response names.

One request is one TransformerLens ``generic_activation_patch`` sweep: a clean source, the
corrupted tokens, the activation to patch (TransformerLens short name such as ``resid_pre`` or
``z``), the index axes (first ``layer``) and a metric. The server answers, per index row, the
metric of the corrupted run with that one slice of the clean activation patched in — exactly what
TransformerLens's one-forward-per-row loop computes, but batched.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ._api import ModelName, Timeout, TokenInput
from ._base import Body
from ._limits import bounded_length
from ._metrics import PatchMetric
from ._tensor_values import TensorValue

PatchAxis = Literal["layer", "pos", "head_index", "head", "src_pos", "dest_pos"]

# Activation short names (TransformerLens ``utils.get_act_name``) and their hook templates.
PATCH_ACTIVATIONS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_in": "blocks.{layer}.hook_mlp_in",
    "attn_in": "blocks.{layer}.hook_attn_in",
    "q_input": "blocks.{layer}.hook_q_input",
    "k_input": "blocks.{layer}.hook_k_input",
    "v_input": "blocks.{layer}.hook_v_input",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "result": "blocks.{layer}.attn.hook_result",
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "pre": "blocks.{layer}.mlp.hook_pre",
    "pre_linear": "blocks.{layer}.mlp.hook_pre_linear",
    "post": "blocks.{layer}.mlp.hook_post",
}

PatchMethod = Literal["activation", "attribution"]

# Names of the tensors in a patching response.
PATCHING_METRIC = "patching.metric"  # [rows]: the metric per index row
PATCHING_LOGITS = "patching.logits"  # [rows, batch, positions, d_vocab]: metric kind "logits"


class PatchingRequest(Body):
    """A TransformerLens ``generic_activation_patch`` sweep. Exactly one clean source: ``clean``
    (tokens or text, run on the server), ``clean_cache`` (a stored cache id) or
    ``clean_activations`` (hook name -> tensor, inline or a stored-tensor ref)."""

    model: ModelName = None
    corrupted: TokenInput = Field(description="corrupted tokens [batch, pos] (or text)")
    clean: TokenInput | None = None
    clean_cache: str | None = Field(None, min_length=1, max_length=128)
    clean_activations: Annotated[
        dict[str, TensorValue] | None, bounded_length("max_names", "clean activations")
    ] = None
    prepend_bos: bool | None = None
    activation: str = Field(description="short name: resid_pre, attn_out, z, q, k, v, pattern …")
    axes: list[PatchAxis] = Field(
        min_length=1, description="index axes, TransformerLens names; the first is 'layer'"
    )
    index: Annotated[
        list[Annotated[list[int], Field(max_length=8)]] | None,
        bounded_length("max_patching_rows", "index rows"),
    ] = Field(None, description="explicit index rows (like index_df); null: every combination")
    metric: PatchMetric
    method: PatchMethod = Field(
        "activation",
        description="'activation': one patched run per index row (TransformerLens's "
        "generic_activation_patch); 'attribution': its linear approximation from one forward "
        "and backward of the corrupted run and the clean activations — the corrupted metric "
        "plus sum over the patched slice of grad * (clean - corrupted)",
    )
    patches_per_forward: int | None = Field(
        None,
        ge=1,
        description="cap on patched copies per forward (default and upper bound: the server's "
        "memory budget)",
    )
    timeout_s: Timeout = None

    @model_validator(mode="after")
    def _sources(self) -> PatchingRequest:
        given = [
            name
            for name in ("clean", "clean_cache", "clean_activations")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'clean', 'clean_cache', 'clean_activations' "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.axes[0] != "layer":
            raise ValueError("the first index axis must be 'layer'")
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"index axes repeat: {self.axes}")
        return self
