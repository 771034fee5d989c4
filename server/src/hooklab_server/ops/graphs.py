"""Traced hook graphs: validated once against the activation they will see, then run as hooks.

Validation (``compile_graph``) checks every node against the opset table — the op exists, its
arguments have the kinds it takes, references point backwards — then sizes what factories and
expansions would allocate, and replays the graph on ``meta`` tensors of the real activation's
shape: shape errors, bad dims and out-of-range literal indices surface here, naming the node,
before any forward runs. Integer index constants are checked against the sizes they index, and
indices computed inside the graph are range-checked when they run, because on a GPU an
out-of-range index is a device assert that takes the process down for every user. A graph may
edit the activation in place (TransformerLens's contract) but never a constant: constants are
shared (a stored cache, a stored tensor) and a graph runs at every firing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hooklab_proto import (
    OPS,
    OPSET,
    CacheEntry,
    ErrorCode,
    Graph,
    GraphNode,
    Op,
    dtype_code,
)
from hooklab_proto._opset import (
    DEVICE_OPS,
    EINSUM_MAX_OPERANDS,
    OPTIONAL,
    REQUIRED,
)

from .context import OpsContext
from .errors import RequestError, too_large
from .graph_args import (
    INDEX_ARGS,
    MAX_INDEX_INTS,
    OVERLAP_REFUSED,
    RUN_ERRORS,
    Binder,
    GraphError,
    IndexItems,
    Node,
    Ref,
)
from .graph_checks import (
    check_axes,
    check_constant_indices,
    check_running_index,
    flops,
    presize,
    root_of,
)

# --- the compiled graph -----------------------------------------------------------------------


class CompiledGraph:
    """A validated graph, run at every firing of its hook point on the request's rows."""

    def __init__(
        self,
        shape: tuple[int | None, ...],
        consts: list[torch.Tensor],
        nodes: list[Node],
        output: Ref | None,
    ) -> None:
        self.shape = shape
        self.consts = consts
        self.nodes = nodes
        self.output = output
        self.cast_output = True  # a hook's result takes the activation's dtype
        self.where = "graph"  # the graph's place in the request, for errors while it runs
        # The output shares a constant's storage: copied, so a later hook editing the activation
        # in place cannot edit the constant (a stored tensor, a cache entry).
        self.copy_output = False
        # A function of the logits: how many values it returns (from the replay on meta), which
        # is what the response carries instead of the logits.
        self.output_elements: int | None = None

    def matches(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want is None or want == size for want, size in zip(self.shape, shape, strict=True)
        )

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        consts = [const.to(x.device) for const in self.consts]
        slots: list[Any] = []
        for number, node in enumerate(self.nodes):
            try:
                slots.append(self._run_node(node, x, consts, slots))
            except RequestError as exc:  # a computed index out of range
                at = f"{self.where}.nodes[{number}] ({node.op.name})"
                raise RequestError(exc.code, f"{at}: {exc.message}", exc.hint) from None
            except RUN_ERRORS as exc:
                if isinstance(exc, torch.OutOfMemoryError) or "CUDA error" in str(exc):
                    raise
                # What validation could not foresee from shapes and dtypes alone (an integer
                # division by zero, a kernel this device lacks for the dtype): this request's
                # error, not the server's.
                raise GraphError(
                    f"{self.where}.nodes[{number}] ({node.op.name})",
                    f"failed as it ran: {str(exc).splitlines()[0][:300]}",
                ) from None
        if self.output is None:
            return None
        out = _resolve(self.output, x, consts, slots)
        if self.copy_output:
            out = out.clone()
        return out.to(x.dtype) if self.cast_output else out

    @staticmethod
    def _run_node(node: Node, x: torch.Tensor, consts: list[torch.Tensor], slots: list[Any]) -> Any:
        args = {name: _resolve(value, x, consts, slots) for name, value in node.args.items()}
        for name in node.checked_indices:
            _check_computed_index(node, args, name)
        if node.op.name in DEVICE_OPS:
            args["device"] = x.device
        result = node.op.run(**args)
        return tuple(result) if isinstance(result, list | tuple) else result


def _resolve(value: Any, x: torch.Tensor, consts: list[torch.Tensor], slots: list[Any]) -> Any:
    if isinstance(value, Ref):
        if value.source == "in":
            return x
        if value.source == "c":
            return consts[value.index]
        slot = slots[value.index]
        return slot if value.output is None else slot[value.output]
    if isinstance(value, IndexItems):
        return tuple(_resolve(item, x, consts, slots) for item in value)
    if isinstance(value, list):
        return [_resolve(item, x, consts, slots) for item in value]
    return value


def _check_computed_index(node: Node, args: dict[str, Any], name: str) -> None:
    """A computed index tensor is checked before use (on a GPU, out of range is fatal)."""
    op, index = node.op.name, args[name]
    if op in ("getitem", "setitem"):
        check_running_index(node.args["index"], args, op)
        return
    target = args["self"]
    dim = args.get("dim")
    size = target.shape[dim] if dim is not None else target.numel()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise RequestError(
            ErrorCode.BAD_INDEX, f"{op}: a computed index is out of range 0..{size - 1}"
        )


def compile_graph(
    ctx: OpsContext,
    graph: Graph,
    where: str,
    activation: tuple[int, ...],
    dtype: torch.dtype,
    any_output: bool = False,
) -> tuple[CompiledGraph, int]:
    """Validate ``graph`` for an activation of ``activation``'s shape; the compiled graph and
    the bytes its constants hold. Raises RequestError (422) naming the node at fault. A hook
    returns the activation's shape; with ``any_output`` (a function of the logits) any shape
    no larger than the input."""
    settings = ctx.settings
    if graph.opset != OPSET:
        raise GraphError(
            where,
            f"graph uses opset {graph.opset!r}; this server runs {OPSET!r}",
            "update the hooklab client, or the server",
        )
    shape = tuple(graph.input.shape)
    if len(shape) != len(activation) or any(
        want is not None and want != size for want, size in zip(shape, activation, strict=True)
    ):
        raise GraphError(
            where,
            f"traced for an activation of shape {list(shape)}, but it is {list(activation)}",
        )
    if graph.input.dtype != dtype_code(dtype):
        raise GraphError(
            where, f"traced for {graph.input.dtype}, but the activation is {dtype_code(dtype)}"
        )
    consts, const_bytes = _constants(ctx, graph, where)
    binder = Binder(len(consts), [])
    nodes: list[Node] = []
    x_meta = torch.zeros(activation, dtype=dtype, device="meta")
    meta_consts = [const.to("meta") for const in consts]
    slots: list[Any] = []
    roots: list[set[str]] = []  # per node: the storages its result may share
    total_bytes = 0
    operations = 0
    for number, wire in enumerate(graph.nodes):
        at = f"{where}.nodes[{number}] ({wire.op})"
        op = OPS.get(wire.op)
        if op is None:
            raise GraphError(
                at,
                f"unknown op {wire.op!r}; {OPSET} has {len(OPS)} ops",
                "GET /v1/capabilities lists them",
            )
        node = _bind_node(binder, op, wire, at)
        meta_args = {
            name: _resolve(value, x_meta, meta_consts, slots) for name, value in node.args.items()
        }
        check_axes(op, meta_args, at)
        presize(op, meta_args, at, settings.max_graph_bytes)
        check_constant_indices(op, node, meta_args, consts, at)
        root = root_of(op, node, roots)
        if op.mutates and any(source.startswith("c") for source in root):
            raise GraphError(
                at, "edits a constant in place (a captured or stored tensor)", "clone it first"
            )
        if op.name in OVERLAP_REFUSED and torch._debug_has_internal_overlap(meta_args["self"]) == 1:
            raise GraphError(
                at,
                "writes in place into a tensor whose elements share memory (an expansion)",
                "clone it first",
            )
        if op.name in DEVICE_OPS:
            meta_args["device"] = "meta"
        try:
            result = op.run(**meta_args)
        except RUN_ERRORS as exc:
            raise GraphError(at, str(exc).splitlines()[0][:300]) from None
        outputs = tuple(result) if isinstance(result, list | tuple) else (result,)
        if len(outputs) > MAX_INDEX_INTS:
            raise GraphError(at, f"has {len(outputs)} outputs")
        for item in outputs:
            total_bytes += item.numel() * item.element_size() if op.cost != "view" else 0
        operations += flops(op, meta_args, outputs)
        slots.append(outputs if isinstance(result, list | tuple) else result)
        binder.node_outputs.append(len(outputs) if isinstance(result, list | tuple) else None)
        roots.append(root)
        nodes.append(node)
        if total_bytes > settings.max_graph_bytes:
            raise too_large(
                f"bytes of intermediate tensors in the traced graph {where} (at {at})",
                total_bytes,
                settings.max_graph_bytes,
                "max_graph_bytes",
                "simplify the hook function",
            )
        if operations > settings.max_graph_flops:
            raise too_large(
                f"operations in the traced graph {where} (at {at})",
                operations,
                settings.max_graph_flops,
                "max_graph_flops",
                "simplify the hook function",
            )
    output = _output(binder, graph, slots, x_meta, activation, where, any_output)
    compiled = CompiledGraph(shape, consts, nodes, output)
    compiled.cast_output = not any_output
    compiled.where = where
    if any_output and output is not None:
        compiled.output_elements = _resolve(output, x_meta, [], slots).numel()
    if output is not None and output.source != "in":
        output_root = {f"c{output.index}"} if output.source == "c" else roots[output.index]
        compiled.copy_output = any(source.startswith("c") for source in output_root)
    return compiled, const_bytes


def _constants(ctx: OpsContext, graph: Graph, where: str) -> tuple[list[torch.Tensor], int]:
    consts: list[torch.Tensor] = []
    total = 0
    for number, const in enumerate(graph.consts):
        what = f"{where}.consts[{number}]"
        if isinstance(const, CacheEntry):
            tensor = ctx.cached_activation(const.cache, const.key)
        else:
            tensor = ctx.tensor(const.tensor, what)
        total += tensor.numel() * tensor.element_size()
        if total > ctx.settings.max_graph_const_bytes:
            raise too_large(
                f"bytes of constants in the traced graph {where}",
                total,
                ctx.settings.max_graph_const_bytes,
                "max_graph_const_bytes",
                "store large tensors with POST /v1/tensors",
            )
        consts.append(tensor)
    return consts, total


def _bind_node(binder: Binder, op: Op, wire: GraphNode, at: str) -> Node:
    unknown = set(wire.args) - {param.name for param in op.params}
    if unknown:
        raise GraphError(
            at,
            f"unknown arguments {sorted(unknown)}; it takes {[param.name for param in op.params]}",
        )
    args: dict[str, Any] = {}
    computed: list[str] = []
    for param in op.params:
        if param.name not in wire.args or wire.args[param.name] is None:
            if param.default is REQUIRED:
                raise GraphError(at, f"argument {param.name!r} is required")
            args[param.name] = None if param.default is OPTIONAL else param.default
            continue
        value = binder.argument(
            op, param.kind, wire.args[param.name], f"{at}.{param.name}", param.choices
        )
        args[param.name] = value
        is_index = op.name in INDEX_ARGS and param.name == INDEX_ARGS[op.name]
        if is_index and isinstance(value, Ref) and value.source != "c":
            computed.append(param.name)
    if op.name == "einsum" and len(args["operands"]) > EINSUM_MAX_OPERANDS:
        raise GraphError(at, f"einsum takes at most {EINSUM_MAX_OPERANDS} operands")
    if op.name in ("getitem", "setitem"):
        args["index"] = IndexItems(args["index"])
    return Node(op, args, tuple(computed))


def _output(
    binder: Binder,
    graph: Graph,
    slots: list[Any],
    x_meta: torch.Tensor,
    activation: tuple[int, ...],
    where: str,
    any_output: bool = False,
) -> Ref | None:
    if graph.output is None:
        return None
    ref = binder.ref(graph.output.model_dump(by_alias=True, exclude_none=True), f"{where}.output")
    value = _resolve(ref, x_meta, [], slots) if ref.source != "c" else None
    if value is None or not isinstance(value, torch.Tensor):
        raise GraphError(where, "the output must be the activation or a node's tensor")
    if any_output:
        if value.numel() > x_meta.numel():
            raise GraphError(where, f"returns {value.numel()} values, more than its input")
    elif tuple(value.shape) != activation:
        raise GraphError(
            where,
            f"returns shape {list(value.shape)} for an activation of shape {list(activation)}",
        )
    return ref
