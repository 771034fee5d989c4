"""Declarative patching metrics: computed on the server, so only the result tensor travels.

Each metric is also an ordinary callable on logits ``[batch, pos, d_vocab]`` returning a 0-d
tensor, so the same object works with TransformerLens's own patching functions::

    metric = metrics.logit_diff(answer_tokens, wrong_tokens)       # at the last position
    patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    metric(logits)                                                  # the same value, locally
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

TokenIds = int | Sequence[int] | torch.Tensor
Kind = Literal["logit_diff", "logit", "prob", "logprob", "loss"]


def _ids(value: TokenIds | None) -> int | list[int] | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor):
        return int(value) if value.dim() == 0 else [int(v) for v in value.reshape(-1)]
    return [int(v) for v in value]


@dataclass(frozen=True)
class Metric:
    """A metric the server understands (see ``hooklab_proto.PatchMetric``)."""

    kind: Kind
    answer: int | list[int] | None = None
    wrong: int | list[int] | None = None
    pos: int | list[int] = -1
    reduce: Literal["mean", "sum"] = "mean"
    normalize: bool = False
    baselines: tuple[float, float] | None = None
    # Only for calling a loss metric locally; the server uses the corrupted tokens it was sent.
    _tokens: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "pos": self.pos, "reduce": self.reduce}
        for key in ("answer", "wrong", "baselines"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.normalize:
            body["normalize"] = True
        return body

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of logits ``[batch, pos, d_vocab]``, computed locally."""
        logits = logits.float()
        batch, pos = logits.shape[:2]
        if self.kind == "loss":
            value = _loss(logits, self._tokens)
        else:
            rows = torch.arange(batch)
            at_pos = torch.tensor(_per_row(self.pos, batch)) % pos
            at = logits[rows, at_pos]  # [batch, d_vocab]
            if self.kind == "prob":
                at = at.softmax(-1)
            elif self.kind == "logprob":
                at = at.log_softmax(-1)
            value = at[rows, torch.tensor(_per_row(self.answer, batch))]
            if self.kind == "logit_diff":
                value = value - at[rows, torch.tensor(_per_row(self.wrong, batch))]
            value = value.mean() if self.reduce == "mean" else value.sum()
        if self.normalize:
            if self.baselines is None:
                raise ValueError(
                    "computing a normalized metric locally needs baselines=(clean, corrupted); "
                    "the server measures them itself"
                )
            clean, corrupted = self.baselines
            value = (value - corrupted) / (clean - corrupted)
        return value


def _per_row(value: int | list[int] | None, batch: int) -> list[int]:
    assert value is not None
    return [value] * batch if isinstance(value, int) else list(value)


def _loss(logits: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    if tokens is None:
        raise ValueError("a loss metric computed locally needs tokens: metrics.loss(tokens)")
    log_probs = F.log_softmax(logits, dim=-1)
    return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None].to(logits.device)).mean()


def logit_diff(
    answer: TokenIds,
    wrong: TokenIds,
    pos: int | Sequence[int] = -1,
    *,
    normalize: bool = False,
    baselines: tuple[float, float] | None = None,
    reduce: Literal["mean", "sum"] = "mean",
) -> Metric:
    """``logits[b, pos_b, answer_b] - logits[b, pos_b, wrong_b]``, averaged over the batch.

    ``normalize=True``: ``(m - corrupted) / (clean - corrupted)``, 0 for the corrupted run and 1
    for the clean one (the IOI notebooks' metric); the server measures both baselines unless
    ``baselines=(clean, corrupted)`` is given."""
    return Metric("logit_diff", _ids(answer), _ids(wrong), _pos(pos), reduce, normalize, baselines)


def logit(
    answer: TokenIds, pos: int | Sequence[int] = -1, *, normalize: bool = False,
    baselines: tuple[float, float] | None = None, reduce: Literal["mean", "sum"] = "mean",
) -> Metric:  # fmt: skip
    """The logit of ``answer`` at ``pos``, averaged over the batch."""
    return Metric("logit", _ids(answer), None, _pos(pos), reduce, normalize, baselines)


def prob(
    answer: TokenIds, pos: int | Sequence[int] = -1, *, normalize: bool = False,
    baselines: tuple[float, float] | None = None, reduce: Literal["mean", "sum"] = "mean",
) -> Metric:  # fmt: skip
    """The probability of ``answer`` at ``pos``, averaged over the batch."""
    return Metric("prob", _ids(answer), None, _pos(pos), reduce, normalize, baselines)


def logprob(
    answer: TokenIds, pos: int | Sequence[int] = -1, *, normalize: bool = False,
    baselines: tuple[float, float] | None = None, reduce: Literal["mean", "sum"] = "mean",
) -> Metric:  # fmt: skip
    """The log-probability of ``answer`` at ``pos``, averaged over the batch."""
    return Metric("logprob", _ids(answer), None, _pos(pos), reduce, normalize, baselines)


def loss(
    tokens: torch.Tensor | None = None,
    *,
    normalize: bool = False,
    baselines: tuple[float, float] | None = None,
) -> Metric:
    """TransformerLens's mean next-token loss of the (corrupted) tokens. The server knows the
    tokens; ``tokens`` is only needed to call the metric locally."""
    metric = Metric("loss", normalize=normalize, baselines=baselines)
    if tokens is not None:
        object.__setattr__(metric, "_tokens", tokens if tokens.dim() == 2 else tokens[None])
    return metric


def objective_wire(
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    logits_shape: Sequence[int],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """A backward pass's objective on the wire: a metric of this module as it is, a Python
    metric of the logits traced (it then runs on the server, where the backward does; one that
    cannot be traced cannot drive it, and raises TypeError saying why)."""
    if isinstance(metric, Metric):
        return metric.to_wire()
    from .tracing import Untraceable, trace

    try:
        graph = trace(metric, "metric", logits_shape, dtype, metric=True).graph
    except Untraceable as exc:
        raise TypeError(
            f"the metric {getattr(metric, '__name__', metric)!r} cannot be traced "
            f"({exc.message} [{exc.reason}]), so it cannot start a backward pass on the server; "
            "use a hooklab.metrics metric or plain tensor operations on the logits"
        ) from None
    return {"kind": "graph", "graph": graph}


def _pos(pos: int | Sequence[int] | torch.Tensor) -> int | list[int]:
    if isinstance(pos, int):
        return pos
    return [int(p) for p in (pos.reshape(-1) if isinstance(pos, torch.Tensor) else pos)]


__all__ = ["Metric", "logit", "logit_diff", "logprob", "loss", "objective_wire", "prob"]
