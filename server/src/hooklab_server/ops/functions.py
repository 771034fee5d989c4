"""Python hook functions at a hook point: traced graphs run here, callbacks run on the client.

A graph spec carries one graph per activation shape it was traced for; each is validated for
the shape the hook point will have (a forward's, or a generation's first pass and its later
steps) and, at each firing, the one matching the activation runs. A callback spec pauses the
forward at each firing and asks the client (``callbacks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hooklab_proto import CallbackSpec, ErrorCode, GraphSpec

from ..engine.hook_points import HookFn
from ..engine.shapes import axis_sizes, hook_shape
from .context import OpsContext
from .errors import RequestError, too_large
from .graphs import CompiledGraph, compile_graph


@dataclass
class FunctionBudget:
    """What the graphs of one request add up to."""

    const_bytes: int = 0


def expected_shapes(
    ctx: OpsContext, name: str, batch: int, pos: int, generation: bool
) -> list[tuple[int, ...]]:
    """The shapes hook point ``name`` takes: a forward's; during generation also a cached
    step's (one position, keys growing) and an uncached step's (the sequence grown by one)."""
    axes = hook_shape(name, ctx.model.cfg)
    cfg = ctx.model.cfg
    sizes = [axis_sizes(cfg, batch, pos)]
    if generation:
        sizes += [axis_sizes(cfg, batch, 1, pos + 1), axis_sizes(cfg, batch, pos + 1)]
    return [tuple(each[axis] for axis in axes) for each in sizes]


def compile_function(
    ctx: OpsContext,
    spec: GraphSpec | CallbackSpec,
    where: str,
    batch: int,
    pos: int,
    generation: bool,
    budget: FunctionBudget,
    name: str | None = None,
) -> HookFn:
    name = name or spec.hook
    if isinstance(spec, CallbackSpec):
        # Imported here: the callback relay imports ops (cancellation, errors) itself.
        from .callbacks import ClientCallback

        return ClientCallback(ctx, spec, name)
    shapes = expected_shapes(ctx, name, batch, pos, generation)
    dtype = ctx.model.cfg.dtype
    graphs: list[CompiledGraph] = []
    for number, graph in enumerate(spec.graphs):
        at = f"{where}.graphs[{number}]"
        traced = tuple(graph.input.shape)
        shape = next(
            (
                shape
                for shape in shapes
                if len(shape) == len(traced)
                and all(
                    want is None or want == size for want, size in zip(traced, shape, strict=True)
                )
            ),
            shapes[0],
        )
        compiled, const_bytes = compile_graph(ctx, graph, at, shape, dtype)
        budget.const_bytes += const_bytes
        if budget.const_bytes > ctx.settings.max_graph_const_bytes:
            raise too_large(
                "bytes of graph constants", budget.const_bytes,
                ctx.settings.max_graph_const_bytes, "max_graph_const_bytes",
                "store large tensors with POST /v1/tensors and refer to them",
            )  # fmt: skip
        graphs.append(compiled)
    return _GraphHook(name, graphs)


class _GraphHook:
    """Runs the graph traced for the activation's shape."""

    def __init__(self, name: str, graphs: list[CompiledGraph]) -> None:
        self.name = name
        self.graphs = graphs

    def __call__(self, x: torch.Tensor, hook: object = None) -> torch.Tensor | None:
        for graph in self.graphs:
            if graph.matches(x.shape):
                return graph.run(x)
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"the traced hook function at {self.name!r} has no graph for an activation of shape "
            f"{list(x.shape)} (traced for {[list(g.shape) for g in self.graphs]})",
            "pass the function again; the client traces it for the shapes it will see",
        )
