"""The checks of a traced graph's nodes beyond their argument kinds: what factories would make,
index values against the axes they index, axes and masks, which storage a result may share,
and the work a node does (``ops/graphs.py`` runs them during validation and, for indices
computed in the graph, as it runs)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from hooklab_proto import ErrorCode, Kind, Op

from .errors import RequestError, too_large
from .graph_args import ALIASING, AXIS_PARAMS, INDEX_ARGS, MAX_INT, GraphError, Node, Ref


def presize(op: Op, args: dict[str, Any], at: str, limit: int) -> None:
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


def check_constant_indices(
    op: Op, node: Node, meta_args: dict[str, Any], consts: list[torch.Tensor], at: str
) -> None:
    """Integer constants used as indices must be in range of the axis they index."""
    if op.name in INDEX_ARGS:
        ref = node.args[INDEX_ARGS[op.name]]
        if isinstance(ref, Ref) and ref.source == "c":
            target = meta_args["self"]
            dim = meta_args.get("dim")
            size = target.shape[dim] if dim is not None else target.numel()
            in_range(consts[ref.index], 0, size, at)
    if op.name in ("getitem", "setitem") and check_index_items(
        node.args["index"], meta_args["index"], meta_args["self"], consts, at
    ):
        node.checked_indices = ("index",)


def indexed_axes(
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


def check_index_items(
    items: list[Any],
    resolved: tuple[Any, ...],
    target: torch.Tensor,
    consts: list[torch.Tensor],
    at: str,
) -> bool:
    """Each integer index item against the size of the axis it indexes; whether an index is
    computed in the graph (then checked as it runs)."""
    computed = False
    for item, value, size in indexed_axes(items, resolved, target):
        if isinstance(item, Ref) and item.source == "c":
            in_range(consts[item.index], -size, size, at)
        elif isinstance(item, Ref):
            if value.dtype.is_floating_point or value.is_complex():
                raise GraphError(at, f"an index tensor must hold integers, not {value.dtype}")
            computed = True
        elif isinstance(item, list):
            in_range(torch.tensor(item), -size, size, at)
    return computed


def check_running_index(items: list[Any], args: dict[str, Any], at: str) -> None:
    """Indices computed in the graph, against the axes they index (before the op runs)."""
    for item, value, size in indexed_axes(items, args["index"], args["self"]):
        if isinstance(item, Ref) and item.source != "c":
            in_range(value, -size, size, at)


def in_range(index: torch.Tensor, low: int, high: int, at: str) -> None:
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


def root_of(op: Op, node: Node, roots: list[set[str]]) -> set[str]:
    """The storages ``op``'s result may share: its ``self``'s when it can be a view."""
    source = node.args.get("self")
    if op.name == "einsum":  # "ij->ji" is a view of its operand
        return set().union(*(root_of_ref(ref, roots) for ref in node.args["operands"]))
    if not isinstance(source, Ref):
        return {f"n{len(roots)}"}
    own = (
        {"in"}
        if source.source == "in"
        else ({f"c{source.index}"} if source.source == "c" else roots[source.index])
    )
    return set(own) if op.name in ALIASING or op.mutates else {f"n{len(roots)}"}


def root_of_ref(ref: Ref, roots: list[set[str]]) -> set[str]:
    if ref.source == "in":
        return {"in"}
    return {f"c{ref.index}"} if ref.source == "c" else roots[ref.index]


def check_axes(op: Op, args: dict[str, Any], at: str) -> None:
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
        if param.name not in AXIS_PARAMS or param.kind not in (Kind.DIM, Kind.DIMS):
            continue
        for dim in value if isinstance(value, list) else [] if value is None else [value]:
            if not -rank <= dim < rank:
                raise GraphError(
                    f"{at}.{param.name}", f"axis {dim} is out of range for {target.dim()} axes"
                )
    if op.name == "index_select" and args["index"].dim() > 1:
        raise GraphError(f"{at}.index", "index_select takes a 0-d or 1-d index")
    if op.name in ("getitem", "setitem"):
        check_masks(args["index"], target, at)


def check_masks(resolved: tuple[Any, ...], target: torch.Tensor, at: str) -> None:
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


def flops(op: Op, args: dict[str, Any], outputs: Sequence[torch.Tensor]) -> int:
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
