"""The argument forms of a traced graph's nodes, and their checking (``ops/graphs.py`` runs them).

Every wire argument is read into a run-time form — a :class:`Ref` to a value (the activation, a
constant, an earlier node's output), a literal, an index list — after checking that it has the
kind its op's parameter takes (``hooklab_proto.OPS``); anything else is a 422 naming where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hooklab_proto import OPS, ErrorCode, Kind, Op, WireFormatError, torch_dtype
from hooklab_proto._opset import EINSUM_CHARS, EINSUM_MAX_LENGTH

from .errors import RequestError

MAX_LIST = 16  # items of a size, dims or index list (ints lists: MAX_INDEX_INTS)
MAX_INDEX_INTS = 4096
MAX_INT = 2**31 - 1
# Ops whose result may share the storage of their ``self`` argument.
CASTS = ("float", "double", "half", "bfloat16", "long", "int", "bool")  # self when no change
ALIASING = frozenset(
    name for name, op in OPS.items() if op.cost == "view" or name in ("to", "contiguous", *CASTS)
) | {"setitem"}
# Arguments that name axes of the op's tensor (DIMS also types split sizes and roll shifts).
AXIS_PARAMS = frozenset(
    {"dim", "dims", "dim0", "dim1", "dim2", "start_dim", "end_dim", "source", "destination"}
)
# In-place ops that torch refuses on a tensor whose elements share memory (an expansion);
# fill_, zero_, masked_fill_ and setitem accept some such writes.
OVERLAP_REFUSED = frozenset(name for name, op in OPS.items() if op.mutates) - {
    "setitem",
    "fill_",
    "zero_",
    "masked_fill_",
}
RUN_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, ArithmeticError)
INDEX_ARGS = {"gather": "index", "index_select": "index", "take_along_dim": "indices"}


class GraphError(RequestError):
    def __init__(self, where: str, message: str, hint: str | None = None) -> None:
        super().__init__(ErrorCode.VALIDATION, f"{where}: {message}", hint)


# --- argument forms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A value reference, resolved at run time: the activation, a constant, a node output."""

    source: str  # "in" | "c" | "n"
    index: int = 0
    output: int | None = None


def literal_number(value: Any, where: str) -> float | int | bool:
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


class Binder:
    """Turns one node's wire arguments into run-time arguments, checking their kinds."""

    def __init__(self, n_consts: int, node_outputs: list[int | None]) -> None:
        self.n_consts = n_consts
        # per earlier node: None (one tensor), or the number of tensors in its tuple
        self.node_outputs = node_outputs

    def ref(self, value: Any, where: str) -> Ref:
        if isinstance(value, dict):
            if set(value) == {"in"} and value["in"] == 0:
                return Ref("in")
            if set(value) == {"c"} and isinstance(value["c"], int):
                if not 0 <= value["c"] < self.n_consts:
                    raise GraphError(where, f"constant {value['c']} does not exist")
                return Ref("c", value["c"])
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
                return Ref("n", node, output)
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
                else (literal_number(value, where))
            )
        if kind is Kind.NUMBER:
            return literal_number(value, where)
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


@dataclass
class Node:
    op: Op
    args: dict[str, Any]  # resolved forms: Ref, lists of Ref, literals, index lists
    checked_indices: tuple[str, ...]  # arguments that are computed index tensors


class IndexItems(list[Any]):
    """An index list, resolved to the tuple torch indexes with."""
