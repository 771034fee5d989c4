"""Metrics of logits, computed on the server: a patching sweep's measure of each patched run,
and the objective a backward pass starts from (``hooklab_proto.PatchMetric``)."""

from __future__ import annotations

import torch

from hooklab_proto import ErrorCode, Graph, PatchMetric
from hooklab_server.engine import lm_cross_entropy_loss

from .context import OpsContext
from .errors import RequestError
from .graphs import CompiledGraph, compile_graph


class Metric:
    """A metric over logits at a few positions, vectorised over patched copies; ``value`` is
    one run's, differentiable (the objective of a backward pass)."""

    def __init__(self, spec: PatchMetric, tokens: torch.Tensor, d_vocab: int) -> None:
        self.spec = spec
        self.tokens = tokens
        self.graph: CompiledGraph | None = None
        self.filler: torch.Tensor | None = None  # kind graph: logits where it reads none
        batch, pos = tokens.shape
        if spec.kind == "loss":
            self.positions = list(range(pos))
            return
        if spec.kind in ("logits", "graph"):
            wanted = spec.positions if spec.positions is not None else list(range(pos))
            self.positions = sorted({_position(p, pos) for p in wanted})
            return
        read = [_position(p, pos) for p in _per_row(spec.pos, batch, "pos")]
        self.positions = sorted(set(read))
        self.rows = torch.arange(batch)
        self.slot = torch.tensor([self.positions.index(p) for p in read])
        self.answer = _token_ids(spec.answer, batch, d_vocab, "answer")
        self.wrong = None
        if spec.wrong is not None:
            self.wrong = _token_ids(spec.wrong, batch, d_vocab, "wrong")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[copies, batch, positions, d_vocab] -> [copies]."""
        spec, logits = self.spec, logits.float()
        if self.graph is not None:
            return torch.stack([self._traced(copy) for copy in logits])
        if spec.kind == "loss":
            tokens = self.tokens.to(logits.device)
            return torch.stack([lm_cross_entropy_loss(copy, tokens) for copy in logits])
        at = logits[:, self.rows, self.slot]  # [copies, batch, d_vocab]
        if spec.kind == "prob":
            at = at.softmax(-1)
        elif spec.kind == "logprob":
            at = at.log_softmax(-1)
        value = at[:, self.rows, self.answer]
        if spec.kind == "logit_diff":
            value = value - at[:, self.rows, self.wrong]
        return value.mean(-1) if spec.reduce == "mean" else value.sum(-1)

    def normalized(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` mapped by the given baselines when normalized (patching sweeps measure
        theirs; a backward pass needs them given)."""
        if not self.spec.normalize or self.spec.baselines is None:
            return value
        clean, corrupted = self.spec.baselines
        return (value - corrupted) / (clean - corrupted)

    def of_copies(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of each copy's full logits [copies, batch, pos, d_vocab] -> [copies],
        differentiable."""
        if self.graph is not None:
            return torch.stack([self.value(copy) for copy in logits])
        return self(logits[:, :, self.positions])

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of one run's full logits [batch, pos, d_vocab], a 0-d tensor."""
        if self.graph is not None:
            value = self.graph.run(logits)
            assert value is not None
            return value.reshape(()).float()
        return self(logits[None][:, :, self.positions])[0]

    def _traced(self, logits: torch.Tensor) -> torch.Tensor:
        """The client's metric on one patched run's logits."""
        assert self.graph is not None and self.filler is not None
        full = self.filler.clone()
        full[:, self.positions] = logits.to(full.dtype)
        value = self.graph.run(full)
        assert value is not None
        return value.reshape(()).float()

    def compile(self, ctx: OpsContext, graph: Graph, batch: int, pos: int) -> None:
        cfg = ctx.model.cfg
        shape = (batch, pos, cfg.d_vocab_out)
        self.graph, _ = compile_graph(ctx, graph, "metric.graph", shape, cfg.dtype, True)
        out = self.graph.run(torch.zeros(shape, dtype=cfg.dtype, device="meta"))
        if out is None or out.numel() != 1:
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                "metric.graph must give one value per patched run, like TransformerLens's "
                f"patching_metric (it gives {0 if out is None else out.numel()})",
                "reduce it, e.g. with .mean()",
            )


def _position(value: int, pos: int) -> int:
    if not -pos <= value < pos:
        raise RequestError(ErrorCode.BAD_INDEX, f"position {value} is outside 0..{pos - 1}")
    return value % pos


def _per_row(value: int | list[int], batch: int, what: str) -> list[int]:
    values = [value] * batch if isinstance(value, int) else list(value)
    if len(values) != batch:
        raise RequestError(
            ErrorCode.BAD_SHAPE, f"metric {what} has {len(values)} values for a batch of {batch}"
        )
    return values


def _token_ids(value: int | list[int] | None, batch: int, d_vocab: int, what: str) -> torch.Tensor:
    ids = _per_row(value if value is not None else 0, batch, what)
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise RequestError(
            ErrorCode.BAD_INDEX, f"metric {what} token {bad[0]} is outside 0..{d_vocab - 1}"
        )
    return torch.tensor(ids)
