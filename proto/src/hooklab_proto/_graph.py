"""Traced hook graphs: a Python hook function recorded by the client as tensor operations.

A graph is a list of nodes in order; each node names an op of the opset (``_opset.OPS``) and
its arguments by parameter name. Values are ``{"in": 0}`` (the activation), ``{"c": k}``
(constant k) or ``{"n": i}`` / ``{"n": i, "o": j}`` (node i's output, or output j of a
multi-output node); a node refers only to earlier nodes, so a graph is acyclic as written.
``output`` is the returned value, or null for "the activation, as edited in place". The
argument forms are in proto/README.md ("Traced hooks"); the server checks them against the
opset before anything runs, and runs only ops from that table.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ._base import Body
from ._limits import bounded_length
from ._opset import OPSET
from ._tensor_values import MAX_AXIS, DtypeCode, TensorValue


class InputRef(Body):
    in_: Literal[0] = Field(alias="in")


class NodeRef(Body):
    n: int = Field(ge=0)
    o: int | None = Field(None, ge=0, le=4096)


class GraphInput(Body):
    """The activation the graph was traced on. A null axis matches any size (a graph that
    holds for every step of a generation)."""

    shape: list[Annotated[int, Field(ge=0, le=MAX_AXIS)] | None] = Field(max_length=8)
    dtype: DtypeCode


class CacheEntry(Body):
    """An activation of a cache stored on the server (``run_with_cache(store=True)``)."""

    cache: str = Field(min_length=1, max_length=128)
    key: str = Field(min_length=1, max_length=256)


class TensorConst(Body):
    tensor: TensorValue


GraphConst = TensorConst | CacheEntry


class GraphNode(Body):
    op: str = Field(min_length=1, max_length=32)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded(self) -> GraphNode:
        if len(self.args) > 8:
            raise ValueError(f"op {self.op!r} has {len(self.args)} arguments; at most 8")
        return self


class GraphOrigin(Body):
    """Where the function came from, for messages: its name, file and line."""

    fn: str = Field("", max_length=128)
    file: str = Field("", max_length=256)
    line: int = Field(0, ge=0)


class Graph(Body):
    graph_v: Literal[1] = 1  # GRAPH_VERSION
    opset: str = Field(OPSET, max_length=32)
    input: GraphInput
    consts: Annotated[list[GraphConst], bounded_length("max_graph_consts", "graph constants")] = (
        Field(default_factory=list)
    )
    nodes: Annotated[list[GraphNode], bounded_length("max_graph_nodes", "graph nodes")] = Field(
        default_factory=list
    )
    output: NodeRef | InputRef | None = None
    origin: GraphOrigin = Field(default_factory=GraphOrigin)


class GraphSpec(Body):
    """A traced Python hook function at one hook point. ``graphs`` holds one graph per
    activation shape it was traced for (a generation's first pass and its later steps); each
    firing runs the first whose input shape matches."""

    hook: str = Field(min_length=1, max_length=256, description="an exact hook name")
    op: Literal["graph"] = "graph"
    graphs: list[Graph] = Field(min_length=1, max_length=4)


class CallbackSpec(Body):
    """A Python hook function that runs on the client: at each firing the server pauses the
    forward and sends the activation over the callback websocket (``/v1/callbacks``) of
    ``session``; the reply replaces the activation or leaves it."""

    hook: str = Field(min_length=1, max_length=256, description="an exact hook name")
    op: Literal["callback"] = "callback"
    session: str = Field(min_length=1, max_length=64)
    callback: str = Field(min_length=1, max_length=64, description="the client's function id")
    timeout_s: float = Field(30.0, gt=0, le=3600)
