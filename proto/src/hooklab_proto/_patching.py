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
from ._graph import Graph
from ._limits import bounded_length
from ._tensor_values import TensorValue

PatchAxis = Literal["layer", "pos", "head_index", "head", "src_pos", "dest_pos"]
MetricKind = Literal["logit_diff", "logit", "prob", "logprob", "loss", "logits", "graph"]

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

# Names of the tensors in a patching response.
PATCHING_METRIC = "patching.metric"  # [rows]: the metric per index row
PATCHING_LOGITS = "patching.logits"  # [rows, batch, positions, d_vocab]: metric kind "logits"

TokenIds = Annotated[int | list[int], bounded_length("max_batch", "token ids")]


class PatchMetric(Body):
    """What to measure on each patched run.

    ``logit_diff``: ``logits[b, pos_b, answer_b] - logits[b, pos_b, wrong_b]``; ``logit``,
    ``prob``, ``logprob``: of ``answer_b`` at ``pos_b``; all reduced over the batch rows b.
    ``loss``: TransformerLens's mean next-token loss on the corrupted tokens. ``logits``: no
    metric, the logits at ``positions`` come back so the client can apply its own. ``graph``: the
    client's metric, traced (``graph``, on logits [batch, pos, d_vocab]; one value), run here on
    each patched run — only ``positions`` go through the unembedding, the others hold the
    corrupted run's logits.
    ``normalize`` maps the value to ``(m - corrupted) / (clean - corrupted)`` as the IOI notebooks
    do; baselines come from ``baselines`` or are measured by the server on the clean and corrupted
    runs.
    """

    kind: MetricKind
    answer: TokenIds | None = Field(None, description="token id, or one per batch row")
    wrong: TokenIds | None = Field(None, description="logit_diff: the wrong token id(s)")
    pos: Annotated[int | list[int], bounded_length("max_batch", "positions")] = Field(
        -1, description="position read, or one per batch row"
    )
    reduce: Literal["mean", "sum"] = "mean"
    normalize: bool = False
    baselines: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[clean, corrupted] metric values for normalize",
    )
    positions: Annotated[list[int] | None, bounded_length("max_tokens", "positions")] = Field(
        None,
        description="kind=logits: positions returned; kind=graph: positions the metric "
        "reads (null: all)",
    )
    graph: Graph | None = Field(None, description="kind=graph: the traced metric")

    @model_validator(mode="after")
    def _fields(self) -> PatchMetric:
        needs_answer = self.kind in ("logit_diff", "logit", "prob", "logprob")
        if needs_answer and self.answer is None:
            raise ValueError(f"metric {self.kind!r} needs 'answer'")
        if self.kind == "logit_diff" and self.wrong is None:
            raise ValueError("metric 'logit_diff' needs 'wrong'")
        if (self.kind == "graph") != (self.graph is not None):
            raise ValueError("'graph' goes with kind 'graph', and only with it")
        if self.normalize and self.kind == "logits":
            raise ValueError("'logits' returns raw logits; normalize applies to a metric")
        return self


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
