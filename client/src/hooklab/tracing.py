"""Record a Python hook function as a graph of tensor operations the server can run.

The function is called once, here, on a stand-in of the activation: a ``meta`` tensor of its
shape and dtype, which has no values. A ``TorchFunctionMode`` sees every torch call it makes;
each call on the stand-in (or on what came from it) is bound to an op of the opset
(``hooklab_proto.OPS``) and becomes a node; tensors the function captured (a clean cache entry,
a steering vector) become constants, and work that touches only them is done here, so
``clean[:, pos]`` uploads the slice, not the whole cache entry. Anything the server could not
reproduce — reading a value (``if x.sum() > 0``, ``.item()``, printing a tensor), an op outside
the opset, printing, storing the activation in Python state — raises :class:`Untraceable` with a
reason, and the caller falls back to running the function on the client (a callback).
"""

from __future__ import annotations

import contextlib
import io
import linecache
import math
import numbers
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from hooklab_proto import OPS, OPSET, Kind, Op, dtype_code
from hooklab_proto._opset import DEVICE_OPS, OPTIONAL, REQUIRED

from .tracing_aliases import ALIASES, PROPERTY_READS, VALUE_READS, BindError, getter
from .tracing_prescreen import StandInHook, Untraceable, prescreen, unwrap

MAX_INDEX_LIST = 4096
DEVICE_READ = getter("device")
# Factories without traced arguments making at most this many elements become constants (their
# values then known to the server's checks, e.g. an index); larger ones are made there.
FOLD_ELEMENTS = 4096
SMALL_FACTORIES = frozenset({"zeros", "ones", "full", "arange"})
# Multi-output ops give the user what torch gives: a named tuple (``x.max(-1).values``).
_RETURN_TYPES: dict[str, Any] = {
    "max_dim": torch.return_types.max,
    "min_dim": torch.return_types.min,
    "topk": torch.return_types.topk,
    "sort": torch.return_types.sort,
}


def _user_line() -> str:
    """file:line of the innermost frame outside torch and hooklab (the user's code)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/torch/" not in filename and "/hooklab/" not in filename and "einops" not in filename:
            text = linecache.getline(filename, frame.f_lineno).strip()
            return f"{filename}:{frame.f_lineno}" + (f" `{text}`" if text else "")
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


# --- values: what the recorder knows about each tensor it has seen ---------------------------


class _Recording:
    """The graph being built: nodes, constants, and which tensor is which value."""

    def __init__(self, stand_in: torch.Tensor) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.consts: list[dict[str, Any]] = []
        self.refs: dict[int, Any] = {id(stand_in): {"in": 0}}  # traced tensor id -> wire ref
        self.const_ids: dict[int, int] = {}  # real tensor id -> constant number
        self.keep: list[Any] = [stand_in]  # ids stay unique while these live
        # Each traced tensor's layout when made: ``set_`` reaches no TorchFunctionMode, so a
        # change of layout behind the recorder's back is found by comparing at the end.
        self.layouts: dict[int, tuple[Any, ...]] = {id(stand_in): _layout(stand_in)}

    def relaid(self) -> bool:
        """Whether a traced tensor's shape or storage changed unseen (``x.set_(…)``)."""
        return any(
            id(value) in self.layouts and _layout(value) != self.layouts[id(value)]
            for value in self.keep
            if isinstance(value, torch.Tensor)
        )

    def is_traced(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.refs

    def ref(self, tensor: torch.Tensor) -> Any:
        """The wire reference of a tensor: traced, or (real) a constant, added once."""
        if id(tensor) in self.refs:
            return self.refs[id(tensor)]
        if tensor.device.type == "meta":
            raise Untraceable("op-not-allowed", "a tensor made on the meta device cannot be sent")
        if tensor.requires_grad:
            raise Untraceable(
                "grad-into-client-tensor",
                "it uses a tensor that requires grad; gradients into client tensors are not "
                "supported (detach it)",
            )
        number = self.const_ids.get(id(tensor))
        if number is None:
            number = len(self.consts)
            self.consts.append({"tensor": tensor.detach().contiguous()})
            self.const_ids[id(tensor)] = number
            self.keep.append(tensor)
        return {"c": number}

    def add_node(self, op: str, args: dict[str, Any], result: Any) -> None:
        index = len(self.nodes)
        self.nodes.append({"op": op, "args": args})
        if isinstance(result, torch.Tensor):
            self.refs[id(result)] = {"n": index}
            self.keep.append(result)
            self.layouts.setdefault(id(result), _layout(result))
        else:
            for position, item in enumerate(result):
                self.refs[id(item)] = {"n": index, "o": position}
                self.keep.append(item)
                self.layouts.setdefault(id(item), _layout(item))


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(tensor.shape), tensor.dtype, tensor.stride(), tensor.storage_offset())


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.detach().to("meta")
    if isinstance(value, list | tuple):
        return type(value)(_meta(item) for item in value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else {"float": repr(value)}
    raise Untraceable("op-not-allowed", f"{type(value).__name__} is not a number")


def _ints(value: Any, what: str) -> list[int]:
    items = list(value) if isinstance(value, torch.Size | list | tuple) else [value]
    if not all(isinstance(item, numbers.Integral) for item in items):
        raise Untraceable("op-not-allowed", f"{what} must be whole numbers, got {value!r}")
    return [int(item) for item in items]


class _Recorder(TorchFunctionMode):
    def __init__(self, recording: _Recording) -> None:
        super().__init__()
        self.r = recording

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        traced = _any_traced(self.r, args, kwargs)
        if func in PROPERTY_READS:
            if traced and func is DEVICE_READ:
                return torch.device("cpu")  # factories then make constants the server moves
            if traced and func in ALIASES:  # .T, .mT: views recorded as nodes
                return self._record(func, args, kwargs)
            return func(*args, **kwargs)
        if func in VALUE_READS and traced:
            raise Untraceable(VALUE_READS[func], f"line {_user_line()} reads a tensor's value")
        binding = ALIASES.get(func)
        if not traced and (binding is None or not OPS[binding.op].creates):
            return self._fold(func, args, kwargs)
        small = binding is not None and binding.op in SMALL_FACTORIES
        if not traced and small and _made_elements(binding, args, kwargs) <= FOLD_ELEMENTS:
            return self._fold(func, args, kwargs)  # e.g. torch.arange(batch): a constant
        if binding is None:
            name = resolve_name(func) or getattr(func, "__name__", repr(func))
            raise Untraceable(
                "op-not-allowed", f"line {_user_line()} calls {name}, which is not in {OPSET}"
            )
        return self._record(func, args, kwargs)

    def _fold(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """Work on captured tensors only: done here, now, on their values (an in-place edit of
        the user's own tensor happens as it would in TransformerLens)."""
        result = func(*args, **kwargs)
        for item in result if isinstance(result, tuple | list) else (result,):
            if isinstance(item, torch.Tensor):
                self.r.keep.append(item)
        return result

    def _record(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        binding = ALIASES[func]
        try:
            op_name, named = binding.bind(args, kwargs)
        except (BindError, KeyError, ValueError, TypeError) as exc:
            raise Untraceable("op-not-allowed", f"line {_user_line()}: {exc}") from None
        op = OPS[op_name]
        if op.mutates:
            target = named["self"]
            if not self.r.is_traced(target):
                raise Untraceable(
                    "python-state",
                    f"line {_user_line()} writes a value computed from the activation into a "
                    "tensor outside the hook",
                )
        wire, meta = self._arguments(op, named)
        if op_name in DEVICE_OPS:
            meta["device"] = "meta"
        result = op.run(**meta)
        if op.mutates:
            result = named["self"]  # in place: the same (traced) tensor
        elif isinstance(result, list):
            result = tuple(result)
        elif op_name in _RETURN_TYPES:
            result = _RETURN_TYPES[op_name](result)
        self.r.add_node(op_name, wire, result)
        return result

    def _arguments(self, op: Op, named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        # Defaults torch spells out (dtype=None, out=None) ask for nothing.
        unknown = {k for k, v in named.items() if v is not None} - {p.name for p in op.params}
        if unknown:
            raise Untraceable(
                "op-not-allowed", f"{op.name} was given arguments {sorted(unknown)} hooklab lacks"
            )
        wire: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for param in op.params:
            absent = param.name not in named or named[param.name] is None
            if absent and not (param.kind is Kind.INDEX and param.name in named):  # x[None]
                if param.default is REQUIRED:
                    raise Untraceable("op-not-allowed", f"{op.name} needs {param.name!r}")
                meta[param.name] = None if param.default is OPTIONAL else param.default
                continue
            value = named[param.name]
            wire[param.name], meta[param.name] = self._argument(op, param.kind, value)
        return wire, meta

    def _argument(self, op: Op, kind: Kind, value: Any) -> tuple[Any, Any]:
        r = self.r
        if kind is Kind.TENSOR or (
            kind is Kind.TENSOR_OR_NUMBER and isinstance(value, torch.Tensor)
        ):
            if not isinstance(value, torch.Tensor):
                raise Untraceable("op-not-allowed", f"{op.name} expects a tensor, got {value!r}")
            return r.ref(value), _meta(value)
        if kind is Kind.TENSOR_OR_NUMBER or kind is Kind.NUMBER:
            return _number(value), value
        if kind is Kind.TENSORS:
            tensors = list(value)
            if not all(isinstance(item, torch.Tensor) for item in tensors):
                raise Untraceable("op-not-allowed", f"{op.name} expects a list of tensors")
            return [r.ref(item) for item in tensors], [_meta(item) for item in tensors]
        if kind is Kind.INDEX:
            return self._index(value)
        if kind is Kind.DTYPE:
            return {"dtype": dtype_code(value)}, value
        if kind in (Kind.INT, Kind.DIM):
            (number,) = _ints(value, "an index")
            return number, number
        if kind is Kind.BOOL:
            return bool(value), bool(value)
        if kind in (Kind.DIMS, Kind.SIZE):
            numbers_ = _ints(value, "sizes")
            if kind is Kind.DIMS and not isinstance(value, list | tuple | torch.Size):
                return numbers_[0], numbers_[0]
            return numbers_, numbers_
        return value, value  # EQUATION, CHOICE: strings, checked by the server

    def _index(self, index: Any) -> tuple[list[Any], tuple[Any, ...]]:
        items = index if isinstance(index, tuple) else (index,)
        wire: list[Any] = []
        meta: list[Any] = []
        for item in items:
            if item is None or item is Ellipsis:
                wire.append(None if item is None else {"ellipsis": True})
                meta.append(item)
            elif isinstance(item, bool):
                raise Untraceable("op-not-allowed", "a bool index is not supported")
            elif isinstance(item, numbers.Integral):
                wire.append(int(item))
                meta.append(int(item))
            elif isinstance(item, slice):
                bounds = [item.start, item.stop, item.step]
                if not all(b is None or isinstance(b, numbers.Integral) for b in bounds):
                    raise Untraceable("op-not-allowed", "slice bounds must be whole numbers")
                ints = [None if b is None else int(b) for b in bounds]
                wire.append({"slice": ints})
                meta.append(slice(*ints))
            elif isinstance(item, list) and all(isinstance(i, numbers.Integral) for i in item):
                if len(item) > MAX_INDEX_LIST:
                    raise Untraceable("graph-too-large", f"an index list of {len(item)} items")
                wire.append({"ints": [int(i) for i in item]})
                meta.append([int(i) for i in item])
            elif isinstance(item, torch.Tensor):
                wire.append(self.r.ref(item))
                meta.append(_meta(item))
            else:
                raise Untraceable("op-not-allowed", f"cannot index with {type(item).__name__}")
        return wire, tuple(meta)


def _made_elements(binding: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> float:
    """How many elements a factory call would make, worked out before making any."""
    try:
        op, named = binding.bind(args, kwargs)
        if op == "arange":
            start, end, step = named.get("start", 0), named.get("end"), named.get("step", 1)
            if end is None:
                start, end = 0, start
            return max(0.0, math.ceil((float(end) - float(start)) / float(step)))
        return float(math.prod(int(size) for size in _ints(named["size"], "sizes")))
    except (BindError, KeyError, TypeError, ValueError, ZeroDivisionError, Untraceable):
        return math.inf  # unclear: made on the server, where its size is checked


def _flatten(values: Any) -> list[Any]:
    if isinstance(values, dict):
        values = list(values.values())
    found: list[Any] = []
    for value in values:
        if isinstance(value, list | tuple):
            found.extend(_flatten(value))
        else:
            found.append(value)
    return found


def _any_traced(r: _Recording, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    return any(r.is_traced(value) for value in _flatten(list(args)) + _flatten(kwargs))


@dataclass
class TracedGraph:
    """A traced function's graph (the wire form) for one activation shape."""

    graph: dict[str, Any]
    nodes: int


def trace(
    fn: Callable[..., Any],
    hook_name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    hook: Any = None,
    metric: bool = False,
) -> TracedGraph:
    """The graph of ``fn(activation, hook)`` for an activation of ``shape`` and ``dtype``; with
    ``metric``, of ``fn(logits)`` returning a tensor of any shape (a patching metric)."""
    prescreen(fn)
    stand_in = torch.empty(tuple(shape), dtype=dtype, device="meta")
    recording = _Recording(stand_in)
    printed = io.StringIO()
    hook = hook if hook is not None else StandInHook(hook_name)
    try:
        with contextlib.redirect_stdout(printed), _Recorder(recording):
            returned = fn(stand_in) if metric else fn(stand_in, hook=hook)
    except Untraceable:
        raise
    except NotImplementedError as exc:  # meta has no kernel: a value-dependent op
        raise Untraceable("data-dependent-shape", f"{exc}".splitlines()[0]) from None
    except Exception as exc:  # it needs real values somewhere; it runs as a callback, where
        # a genuine error in it is raised again as itself
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise Untraceable("failed-on-stand-in", f"tracing raised {message}") from None
    if printed.getvalue():
        raise Untraceable("prints", "it prints, and printing runs on your machine")
    if recording.relaid():
        raise Untraceable(
            "op-not-allowed",
            f"it changes a tensor's shape or storage in place (set_), which {OPSET} does not allow",
        )
    if metric and not isinstance(returned, torch.Tensor):
        raise Untraceable("returns-non-tensor", f"it returns {type(returned).__name__}")
    output = _output(recording, returned, returned if metric else stand_in)
    escaped = _escaped(recording, stand_in, returned)
    if escaped:
        raise Untraceable(
            "python-state", "it keeps a tensor derived from the activation in Python state"
        )
    origin = _origin(fn)
    graph = {
        "graph_v": 1,
        "opset": OPSET,
        "input": {"shape": list(shape), "dtype": dtype_code(dtype)},
        "consts": recording.consts,
        "nodes": recording.nodes,
        "output": output,
        "origin": origin,
    }
    return TracedGraph(graph, len(recording.nodes))


def _output(r: _Recording, returned: Any, stand_in: torch.Tensor) -> Any:
    if returned is None:
        return None
    if not isinstance(returned, torch.Tensor):
        raise Untraceable(
            "returns-non-tensor", f"it returns {type(returned).__name__}, not a tensor or None"
        )
    if tuple(returned.shape) != tuple(stand_in.shape):
        raise Untraceable(
            "shape-mismatch",
            f"it returns shape {list(returned.shape)} for an activation of shape "
            f"{list(stand_in.shape)}",
        )
    if r.is_traced(returned):
        return r.refs[id(returned)]
    # A constant (e.g. a cached activation returned whole): sent once, copied by a node.
    r.nodes.append({"op": "clone", "args": {"self": r.ref(returned)}})
    return {"n": len(r.nodes) - 1}


def _escaped(r: _Recording, stand_in: torch.Tensor, returned: Any) -> bool:
    """Whether a traced tensor outlives the trace somewhere other than the return value (the
    function stored it in a list, a dict or an attribute)."""
    ours = {id(stand_in)}
    if isinstance(returned, torch.Tensor):
        ours |= {id(returned), id(returned._base)}
    traced = [
        weakref.ref(value)
        for value in r.keep
        if isinstance(value, torch.Tensor) and value.device.type == "meta" and id(value) not in ours
    ]
    r.keep.clear()
    r.refs.clear()
    return any(ref() is not None for ref in traced)


def _origin(fn: Callable[..., Any]) -> dict[str, Any]:
    inner = unwrap(fn)
    code = getattr(inner, "__code__", None)
    return {
        "fn": str(getattr(inner, "__qualname__", type(inner).__name__))[:128],
        "file": (code.co_filename if code else "")[-256:],
        "line": code.co_firstlineno if code else 0,
    }


# --- recording outside a hook function: lazy logits ------------------------------------------


def start_recording(stand_in: torch.Tensor) -> _Recording:
    """A recording whose input is ``stand_in`` (a meta tensor), for :func:`record_call`."""
    return _Recording(stand_in)


def record_call(
    recording: _Recording, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """Record one torch call on values of ``recording`` (meta tensors); its meta result.
    Raises Untraceable for anything the server could not compute (a value read, an op outside
    the opset): the caller then computes it on real values."""
    if func is DEVICE_READ:
        return torch.device("cpu")
    try:
        return _Recorder(recording).__torch_function__(func, (), args, kwargs)
    except Untraceable:
        raise
    except Exception as exc:  # no meta kernel (a value-dependent shape), a bad argument, …
        raise Untraceable("failed-on-stand-in", f"{type(exc).__name__}: {exc}") from None


def graph_for(recording: _Recording, value: torch.Tensor) -> dict[str, Any]:
    """The wire graph computing ``value`` (a recorded meta tensor) from the input."""
    stand_in = recording.keep[0]
    return {
        "graph_v": 1,
        "opset": OPSET,
        "input": {"shape": list(stand_in.shape), "dtype": dtype_code(stand_in.dtype)},
        "consts": list(recording.consts),
        "nodes": list(recording.nodes),
        "output": recording.refs[id(value)],
    }


__all__ = [
    "FOLD_ELEMENTS",
    "StandInHook",
    "TracedGraph",
    "Untraceable",
    "graph_for",
    "prescreen",
    "record_call",
    "start_recording",
    "trace",
]
