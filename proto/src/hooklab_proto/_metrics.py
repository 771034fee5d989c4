"""Metrics: what a patching sweep measures on each run, and the scalar a backward pass starts
from (the same vocabulary; ``hooklab.metrics`` on the client)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ._base import Body
from ._forms import one_of
from ._graph import Graph
from ._limits import bounded_length

MetricKind = Literal["logit_diff", "logit", "prob", "logprob", "loss", "logits", "graph"]
TokenIds = Annotated[
    int | list[int],
    bounded_length("max_batch", "token ids"),
    one_of("a token id (464) or one per batch row ([464, 2068])"),
]


class PatchMetric(Body):
    """What to measure on each patched run, or the objective of a backward pass.

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
    pos: Annotated[
        int | list[int],
        bounded_length("max_batch", "positions"),
        one_of("a position (-1) or one per batch row ([3, 5])"),
    ] = Field(-1, description="position read, or one per batch row")
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
