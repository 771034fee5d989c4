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

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import (
    OPS,
    OPSET,
    CacheEntry,
    ErrorCode,
    Graph,
    GraphNode,
    InputRef,
    Kind,
    NodeRef,
    Op,
    WireFormatError,
    dtype_code,
    torch_dtype,
)
from hooklab_proto._opset import (
    DEVICE_OPS,
    EINSUM_CHARS,
    EINSUM_MAX_LENGTH,
    EINSUM_MAX_OPERANDS,
    OPTIONAL,
    REQUIRED,
)

from .context import OpsContext
from .errors import RequestError, too_large

MAX_LIST = 16  # items of a size, dims or index list (ints lists: MAX_INDEX_INTS)
MAX_INDEX_INTS = 4096
MAX_INT = 2**31 - 1
# Ops whose result may share the storage of their ``self`` argument.
_CASTS = ("float", "double", "half", "bfloat16", "long", "int", "bool")  # self when no change
_ALIASING = frozenset(
    name for name, op in OPS.items() if op.cost == "view" or name in ("to", "contiguous", *_CASTS)
) | {"setitem"}
# Arguments that name axes of the op's tensor (DIMS also types split sizes and roll shifts).
_AXIS_PARAMS = frozenset(
    {"dim", "dims", "dim0", "dim1", "dim2", "start_dim", "end_dim", "source", "destination"}
)
# In-place ops that torch refuses on a tensor whose elements share memory (an expansion);
# fill_, zero_, masked_fill_ and setitem accept some such writes.
_OVERLAP_REFUSED = frozenset(name for name, op in OPS.items() if op.mutates) - {
    "setitem",
    "fill_",
    "zero_",
    "masked_fill_",
}
_RUN_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, ArithmeticError)
_INDEX_ARGS = {"gather": "index", "index_select": "index", "take_along_dim": "indices"}


class GraphError(RequestError):
    def __init__(self, where: str, message: str, hint: str | None = None) -> None:
        super().__init__(ErrorCode.VALIDATION, f"{where}: {message}", hint)


# --- argument forms ---------------------------------------------------------------------------

Slot = Callable[[list[Any], torch.Tensor], Any]  # reads a value from the run's slots


@dataclass(frozen=True)
class _Ref:
    """A value reference, resolved at run time: the activation, a constant, a node output."""

    source: str  # "in" | "c" | "n"
    index: int = 0
    output: int | None = None


def _literal_number(value: Any, where: str) -> float | int | bool:
    if isinstance(value, bool | int):
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise GraphError(where, f"{value} is outside the 64-bit integer range")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict) and set(value) == {"float"}:
        text = value["float"]
        if text in ("inf", "-inf", "nan"):
            return float(text)
    raise GraphError(where, f"expected a number, got {str(value)[:60]}")


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -MAX_INT <= value <= MAX_INT:
        raise GraphError(where, f"expected a whole number within ±2^31, got {str(value)[:60]}")
    return value


def _ints(value: Any, where: str, limit: int = MAX_LIST) -> list[int]:
    if not isinstance(value, list) or len(value) > limit:
        raise GraphError(where, f"expected a list of at most {limit} whole numbers")
    return [_int(item, where) for item in value]


class _Binder:
    """Turns one node's wire arguments into run-time arguments, checking their kinds."""

    def __init__(self, n_consts: int, node_outputs: list[int | None]) -> None:
        self.n_consts = n_consts
        # per earlier node: None (one tensor), or the number of tensors in its tuple
        self.node_outputs = node_outputs

    def ref(self, value: Any, where: str) -> _Ref:
        if isinstance(value, dict):
            if set(value) == {"in"} and value["in"] == 0:
                return _Ref("in")
            if set(value) == {"c"} and isinstance(value["c"], int):
                if not 0 <= value["c"] < self.n_consts:
                    raise GraphError(where, f"constant {value['c']} does not exist")
                return _Ref("c", value["c"])
            if {"n"} <= set(value) <= {"n", "o"} and isinstance(value["n"], int):
                node = value["n"]
                if not 0 <= node < len(self.node_outputs):
                    raise GraphError(
                        where, f"node {node} is not an earlier node (references point backwards)"
                    )
                output = value.get("o")
                count = self.node_outputs[node]
                if count is None:  # one tensor: "o" would index into it
                    if output is not None:
                        raise GraphError(where, f"node {node} has one output: leave out 'o'")
                elif output is None:
                    raise GraphError(where, f"node {node} has {count} outputs: name one with 'o'")
                elif not isinstance(output, int) or not 0 <= output < count:
                    raise GraphError(where, f"node {node} has no output {output}")
                return _Ref("n", node, output)
        raise GraphError(
            where, f"expected a value reference ({{'in'|'c'|'n': …}}), got {value!r}"[:200]
        )

    def argument(self, op: Op, kind: Kind, value: Any, where: str, choices: tuple[Any, ...]) -> Any:
        if kind is Kind.TENSOR:
            return self.ref(value, where)
        if kind is Kind.TENSOR_OR_NUMBER:
            return (
                self.ref(value, where)
                if isinstance(value, dict) and "float" not in value
                else (_literal_number(value, where))
            )
        if kind is Kind.NUMBER:
            return _literal_number(value, where)
        if kind in (Kind.INT, Kind.DIM):
            return _int(value, where)
        if kind is Kind.BOOL:
            if not isinstance(value, bool):
                raise GraphError(where, "expected true or false")
            return value
        if kind is Kind.DIMS:
            return _int(value, where) if isinstance(value, int) else _ints(value, where)
        if kind is Kind.SIZE:
            sizes = _ints(value, where)
            if any(size < -1 for size in sizes):
                raise GraphError(where, f"sizes must be -1 or more, got {sizes}")
            return sizes
        if kind is Kind.TENSORS:
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST:
                raise GraphError(where, f"expected a list of 1 to {MAX_LIST} value references")
            return [self.ref(item, where) for item in value]
        if kind is Kind.DTYPE:
            if not isinstance(value, dict) or set(value) != {"dtype"}:
                raise GraphError(where, 'expected {"dtype": code}')
            try:
                return torch_dtype(value["dtype"])
            except WireFormatError as exc:
                raise GraphError(where, str(exc)) from None
        if kind is Kind.EQUATION:
            if (
                not isinstance(value, str)
                or not value
                or len(value) > EINSUM_MAX_LENGTH
                or not set(value) <= EINSUM_CHARS
            ):
                raise GraphError(where, "expected an einsum equation of letters, ',', '->', '...'")
            return value
        if kind is Kind.CHOICE:
            if value not in choices:
                raise GraphError(where, f"expected one of {list(choices)}, got {str(value)[:40]!r}")
            return value
        return self.index(value, where)

    def index(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise GraphError(where, f"an index is a list of at most {MAX_LIST} items")
        items: list[Any] = []
        for item in value:
            if item is None or (isinstance(item, int) and not isinstance(item, bool)):
                items.append(item if item is None else _int(item, where))
            elif isinstance(item, dict) and set(item) == {"slice"}:
                bounds = item["slice"]
                if not isinstance(bounds, list) or len(bounds) != 3:
                    raise GraphError(where, "a slice is [start, stop, step]")
                start, stop, step = (None if b is None else _int(b, where) for b in bounds)
                if step is not None and step <= 0:
                    raise GraphError(where, "slice steps must be positive")
                items.append(slice(start, stop, step))
            elif isinstance(item, dict) and item == {"ellipsis": True}:
                items.append(Ellipsis)
            elif isinstance(item, dict) and set(item) == {"ints"}:
                items.append(_ints(item["ints"], where, MAX_INDEX_INTS))
            else:
                items.append(self.ref(item, where))
        return items


# --- the compiled graph -----------------------------------------------------------------------


@dataclass
class _Node:
    op: Op
    args: dict[str, Any]  # resolved forms: _Ref, lists of _Ref, literals, index lists
    checked_indices: tuple[str, ...]  # arguments that are computed index tensors


class CompiledGraph:
    """A validated graph, run at every firing of its hook point on the request's rows."""

    def __init__(
        self,
        shape: tuple[int | None, ...],
        consts: list[torch.Tensor],
        nodes: list[_Node],
        output: _Ref | None,
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
            except _RUN_ERRORS as exc:
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
    def _run_node(
        node: _Node, x: torch.Tensor, consts: list[torch.Tensor], slots: list[Any]
    ) -> Any:
        args = {name: _resolve(value, x, consts, slots) for name, value in node.args.items()}
        for name in node.checked_indices:
            _check_computed_index(node, args, name)
        if node.op.name in DEVICE_OPS:
            args["device"] = x.device
        result = node.op.run(**args)
        return tuple(result) if isinstance(result, list | tuple) else result


def _resolve(value: Any, x: torch.Tensor, consts: list[torch.Tensor], slots: list[Any]) -> Any:
    if isinstance(value, _Ref):
        if value.source == "in":
            return x
        if value.source == "c":
            return consts[value.index]
        slot = slots[value.index]
        return slot if value.output is None else slot[value.output]
    if isinstance(value, _IndexItems):
        return tuple(_resolve(item, x, consts, slots) for item in value)
    if isinstance(value, list):
        return [_resolve(item, x, consts, slots) for item in value]
    return value


def _check_computed_index(node: _Node, args: dict[str, Any], name: str) -> None:
    """A computed index tensor is checked before use (on a GPU, out of range is fatal)."""
    op, index = node.op.name, args[name]
    if op in ("getitem", "setitem"):
        _check_running_index(node.args["index"], args, op)
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
    binder = _Binder(len(consts), [])
    nodes: list[_Node] = []
    x_meta = torch.zeros(activation, dtype=dtype, device="meta")
    meta_consts = [const.to("meta") for const in consts]
    slots: list[Any] = []
    roots: list[set[str]] = []  # per node: the storages its result may share
    total_bytes = 0
    flops = 0
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
        _check_axes(op, meta_args, at)
        _presize(op, meta_args, at, settings.max_graph_bytes)
        _check_constant_indices(op, node, meta_args, consts, at)
        root = _root_of(op, node, roots)
        if op.mutates and any(source.startswith("c") for source in root):
            raise GraphError(
                at, "edits a constant in place (a captured or stored tensor)", "clone it first"
            )
        if (
            op.name in _OVERLAP_REFUSED
            and torch._debug_has_internal_overlap(meta_args["self"]) == 1
        ):
            raise GraphError(
                at,
                "writes in place into a tensor whose elements share memory (an expansion)",
                "clone it first",
            )
        if op.name in DEVICE_OPS:
            meta_args["device"] = "meta"
        try:
            result = op.run(**meta_args)
        except _RUN_ERRORS as exc:
            raise GraphError(at, str(exc).splitlines()[0][:300]) from None
        outputs = tuple(result) if isinstance(result, list | tuple) else (result,)
        if len(outputs) > MAX_INDEX_INTS:
            raise GraphError(at, f"has {len(outputs)} outputs")
        for item in outputs:
            total_bytes += item.numel() * item.element_size() if op.cost != "view" else 0
        flops += _flops(op, meta_args, outputs)
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
        if flops > settings.max_graph_flops:
            raise too_large(
                f"operations in the traced graph {where} (at {at})",
                flops,
                settings.max_graph_flops,
                "max_graph_flops",
                "simplify the hook function",
            )
    output = _output(binder, graph, slots, x_meta, activation, where, any_output)
    compiled = CompiledGraph(shape, consts, nodes, output)
    compiled.cast_output = not any_output
    compiled.where = where
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


def _bind_node(binder: _Binder, op: Op, wire: GraphNode, at: str) -> _Node:
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
        is_index = op.name in _INDEX_ARGS and param.name == _INDEX_ARGS[op.name]
        if is_index and isinstance(value, _Ref) and value.source != "c":
            computed.append(param.name)
    if op.name == "einsum" and len(args["operands"]) > EINSUM_MAX_OPERANDS:
        raise GraphError(at, f"einsum takes at most {EINSUM_MAX_OPERANDS} operands")
    if op.name in ("getitem", "setitem"):
        args["index"] = _IndexItems(args["index"])
    return _Node(op, args, tuple(computed))


class _IndexItems(list[Any]):
    """An index list, resolved to the tuple torch indexes with."""


def _presize(op: Op, args: dict[str, Any], at: str, limit: int) -> None:
    """What a factory or an expansion would allocate, refused before it is made."""
    if not op.creates:
        return
    if op.name == "arange":
        start, end, step = args["start"], args["end"], args["step"]
        if end is None:
            start, end = 0, start
        if not all(math.isfinite(v) for v in (start, end, step)) or step == 0:
            raise GraphError(at, "arange needs finite bounds and a non-zero step")
        steps = (end - start) / step
        if not math.isfinite(steps) or steps * 8 > limit:
            raise too_large(
                f"elements made by arange at {at}",
                int(min(abs(steps), 2**63)) if math.isfinite(steps) else 2**63,
                limit // 8,
                "max_graph_bytes",
                "make smaller tensors in the hook function",
            )
        count = max(0, math.ceil(steps))
    elif op.name == "repeat":
        count = math.prod(args["repeats"]) * args["self"].numel()
    elif op.name == "pad":
        count = args["self"].numel() + sum(abs(p) for p in args["pad"]) * math.prod(
            args["self"].shape
        )
    else:
        count = math.prod(abs(size) for size in args.get("size") or [1])
    if count * 8 > limit or any(size > MAX_INT for size in args.get("size") or []):
        raise too_large(
            f"elements made by {op.name} at {at}",
            count,
            limit // 8,
            "max_graph_bytes",
            "make smaller tensors in the hook function",
        )


def _check_constant_indices(
    op: Op, node: _Node, meta_args: dict[str, Any], consts: list[torch.Tensor], at: str
) -> None:
    """Integer constants used as indices must be in range of the axis they index."""
    if op.name in _INDEX_ARGS:
        ref = node.args[_INDEX_ARGS[op.name]]
        if isinstance(ref, _Ref) and ref.source == "c":
            target = meta_args["self"]
            dim = meta_args.get("dim")
            size = target.shape[dim] if dim is not None else target.numel()
            _in_range(consts[ref.index], 0, size, at)
    if op.name in ("getitem", "setitem") and _check_index_items(
        node.args["index"], meta_args["index"], meta_args["self"], consts, at
    ):
        node.checked_indices = ("index",)


def _indexed_axes(
    items: list[Any], resolved: tuple[Any, ...], target: torch.Tensor
) -> list[tuple[Any, Any, int]]:
    """(item, its value, the size of the axis it indexes) for each integer index item."""
    consuming = sum(
        (value.dim() if isinstance(value, torch.Tensor) and value.dtype == torch.bool else 1)
        for value in resolved
        if value is not None and value is not Ellipsis
    )
    found: list[tuple[Any, Any, int]] = []
    axis = 0
    for item, value in zip(items, resolved, strict=True):
        if item is None:
            continue
        if item is Ellipsis:
            axis += max(0, target.dim() - consuming)
            continue
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            axis += value.dim()
            continue
        if axis >= target.dim():
            break  # too many indices: the meta replay says so
        found.append((item, value, target.shape[axis]))
        axis += 1
    return found


def _check_index_items(
    items: list[Any],
    resolved: tuple[Any, ...],
    target: torch.Tensor,
    consts: list[torch.Tensor],
    at: str,
) -> bool:
    """Each integer index item against the size of the axis it indexes; whether an index is
    computed in the graph (then checked as it runs)."""
    computed = False
    for item, value, size in _indexed_axes(items, resolved, target):
        if isinstance(item, _Ref) and item.source == "c":
            _in_range(consts[item.index], -size, size, at)
        elif isinstance(item, _Ref):
            if value.dtype.is_floating_point or value.is_complex():
                raise GraphError(at, f"an index tensor must hold integers, not {value.dtype}")
            computed = True
        elif isinstance(item, list):
            _in_range(torch.tensor(item), -size, size, at)
    return computed


def _check_running_index(items: list[Any], args: dict[str, Any], at: str) -> None:
    """Indices computed in the graph, against the axes they index (before the op runs)."""
    for item, value, size in _indexed_axes(items, args["index"], args["self"]):
        if isinstance(item, _Ref) and item.source != "c":
            _in_range(value, -size, size, at)


def _in_range(index: torch.Tensor, low: int, high: int, at: str) -> None:
    if index.dtype.is_floating_point or index.is_complex():
        raise GraphError(at, f"an index tensor must hold integers, not {index.dtype}")
    if index.dtype == torch.bool:
        return
    if index.numel() and (int(index.min()) < low or int(index.max()) >= high):
        raise RequestError(
            ErrorCode.BAD_INDEX,
            f"{at}: index values {int(index.min())}..{int(index.max())} are outside "
            f"{low}..{high - 1}",
        )


def _root_of(op: Op, node: _Node, roots: list[set[str]]) -> set[str]:
    """The storages ``op``'s result may share: its ``self``'s when it can be a view."""
    source = node.args.get("self")
    if op.name == "einsum":  # "ij->ji" is a view of its operand
        return set().union(*(_root_of_ref(ref, roots) for ref in node.args["operands"]))
    if not isinstance(source, _Ref):
        return {f"n{len(roots)}"}
    own = (
        {"in"}
        if source.source == "in"
        else ({f"c{source.index}"} if source.source == "c" else roots[source.index])
    )
    return set(own) if op.name in _ALIASING or op.mutates else {f"n{len(roots)}"}


def _root_of_ref(ref: _Ref, roots: list[set[str]]) -> set[str]:
    if ref.source == "in":
        return {"in"}
    return {f"c{ref.index}"} if ref.source == "c" else roots[ref.index]


def _check_axes(op: Op, args: dict[str, Any], at: str) -> None:
    """Axis arguments within the rank of the tensor they name (some meta kernels do not
    check, and the real kernel then raises as the forward runs)."""
    target = args.get("self", args.get("x1"))
    if not isinstance(target, torch.Tensor):
        tensors = args.get("tensors")
        target = tensors[0] if tensors else None
    if not isinstance(target, torch.Tensor):
        return
    rank = max(1, target.dim() + (1 if op.name == "stack" else 0))
    for param in op.params:
        value = args.get(param.name)
        if param.name not in _AXIS_PARAMS or param.kind not in (Kind.DIM, Kind.DIMS):
            continue
        for dim in value if isinstance(value, list) else [] if value is None else [value]:
            if not -rank <= dim < rank:
                raise GraphError(
                    f"{at}.{param.name}", f"axis {dim} is out of range for {target.dim()} axes"
                )
    if op.name == "index_select" and args["index"].dim() > 1:
        raise GraphError(f"{at}.index", "index_select takes a 0-d or 1-d index")
    if op.name in ("getitem", "setitem"):
        _check_masks(args["index"], target, at)


def _check_masks(resolved: tuple[Any, ...], target: torch.Tensor, at: str) -> None:
    """A boolean mask index has the shape of the axes it covers."""
    consuming = sum(
        (value.dim() if isinstance(value, torch.Tensor) and value.dtype == torch.bool else 1)
        for value in resolved
        if value is not None and value is not Ellipsis
    )
    axis = 0
    for value in resolved:
        if value is None:
            continue
        if value is Ellipsis:
            axis += max(0, target.dim() - consuming)
            continue
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            covered = tuple(target.shape[axis : axis + value.dim()])
            if tuple(value.shape) != covered:
                raise GraphError(
                    f"{at}.index",
                    f"a mask of shape {list(value.shape)} for axes of sizes {list(covered)}",
                )
            axis += value.dim()
            continue
        axis += 1


def _flops(op: Op, args: dict[str, Any], outputs: Sequence[torch.Tensor]) -> int:
    out = sum(item.numel() for item in outputs)
    if op.cost == "matmul":
        inner = args["self"].shape[-1] if args["self"].dim() else 1
        return 2 * out * inner
    if op.cost == "einsum":
        letters = {c for c in args["equation"] if c.isalpha()}
        sizes: dict[str, int] = {}
        inputs = re.split(r",", args["equation"].split("->")[0])
        for term, operand in zip(inputs, args["operands"], strict=False):
            term = term.strip().replace("...", "")
            for letter, size in zip(reversed(term), reversed(operand.shape), strict=False):
                sizes[letter] = size
        return 2 * math.prod(sizes.get(letter, 1) for letter in letters)
    inputs_numel = sum(value.numel() for value in args.values() if isinstance(value, torch.Tensor))
    scale = max(1, math.ceil(math.log2(max(out, 2)))) if op.cost == "sort" else 1
    return (out + inputs_numel) * scale


def _output(
    binder: _Binder,
    graph: Graph,
    slots: list[Any],
    x_meta: torch.Tensor,
    activation: tuple[int, ...],
    where: str,
    any_output: bool = False,
) -> _Ref | None:
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


# ``InputRef``/``NodeRef`` are what ``Graph.output`` holds; named so the import is used.
_OUTPUT_FORMS = (InputRef, NodeRef)
