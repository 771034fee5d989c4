"""The operations a traced hook graph may use (opset ``hooklab-ops/1``), declared once.

Each entry names its parameters in order (the order of the ``torch.Tensor`` method), the kind
of value each takes, its defaults and the function that runs it. The client binds what a hook
function called to these names; the server checks every argument against the kinds and runs
the op through this table — a literal dict, never ``getattr(torch, name)`` — so nothing outside
it can run. Ops that would read uninitialised memory (``empty``), alias storage arbitrarily
(``as_strided``, ``set_``), move data between devices or read values to the host are absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

OPSET = "hooklab-ops/1"
GRAPH_VERSION = 1


class Kind(Enum):
    """What one argument may be on the wire (after refs are resolved, what the op receives)."""

    TENSOR = "tensor"  # a value ref: the activation, a constant or a node's output
    TENSOR_OR_NUMBER = "tensor|number"
    TENSORS = "tensors"  # a list of value refs (cat, stack, einsum operands)
    NUMBER = "number"  # int, float or bool literal
    INT = "int"
    BOOL = "bool"
    DIM = "dim"  # an axis of the tensor argument ``self`` (negative counts from the end)
    DIMS = "dims"  # an int or a list of ints
    SIZE = "size"  # a list of ints (a shape; -1 where torch allows it)
    INDEX = "index"  # a getitem/setitem index (see proto/README.md, traced hooks)
    DTYPE = "dtype"  # {"dtype": "F32"}
    EQUATION = "equation"  # an einsum equation
    CHOICE = "choice"  # one of the op's listed strings


REQUIRED = object()  # the default of a parameter that must be given
OPTIONAL = object()  # a parameter that may be absent or null (None)


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    default: Any = REQUIRED
    choices: tuple[str | None, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Op:
    """One allowed operation. ``outputs`` > 1: a tuple result (values, indices); -1: a list
    whose length depends on the arguments (unbind, split, chunk). ``mutates``: it writes into
    its ``self`` argument. ``cost``: how the server counts its work (see ``op_cost``)."""

    name: str
    params: tuple[Param, ...]
    run: Callable[..., Any]
    outputs: int = 1
    mutates: bool = False
    cost: str = "elementwise"
    creates: bool = False  # a factory: its size arguments are checked before it runs

    def param(self, name: str) -> Param | None:
        return next((param for param in self.params if param.name == name), None)


# --- parameter shorthands -------------------------------------------------------------------

SELF = Param("self", Kind.TENSOR)
OTHER = Param("other", Kind.TENSOR_OR_NUMBER)


def _dim(name: str = "dim", default: Any = REQUIRED) -> Param:
    return Param(name, Kind.DIM, default)


def _keepdim() -> Param:
    return Param("keepdim", Kind.BOOL, False)


def _dtype() -> Param:
    return Param("dtype", Kind.DTYPE, OPTIONAL)


# --- how each kind of op runs -----------------------------------------------------------------


def _call(function: Callable[..., Any], *names: str) -> Callable[..., Any]:
    """Run ``function`` with the named arguments in order, dropping trailing absent ones."""

    def run(**args: Any) -> Any:
        values = [args[name] for name in names]
        return function(*values)

    return run


def _kw(function: Callable[..., Any], first: str = "self") -> Callable[..., Any]:
    """Run ``function(args[first], **rest)``, leaving out optional arguments left as None."""

    def run(**args: Any) -> Any:
        head = args.pop(first)
        return function(head, **{k: v for k, v in args.items() if v is not None})

    return run


def _getitem(self: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    return self[index]


def _setitem(self: torch.Tensor, index: tuple[Any, ...], value: Any) -> torch.Tensor:
    self[index] = value
    return self


def _reduce(function: Callable[..., Any]) -> Callable[..., Any]:
    """sum / mean / amax …: over all elements when ``dim`` is None."""

    def run(self: torch.Tensor, dim: Any = None, keepdim: bool = False, **rest: Any) -> Any:
        extra = {k: v for k, v in rest.items() if v is not None}
        if dim is None:
            return function(self, **extra)
        return function(self, dim, keepdim=keepdim, **extra)

    return run


def _with_dim_or_all(function: Callable[..., Any]) -> Callable[..., Any]:
    def run(self: torch.Tensor, dim: Any = None, keepdim: bool = False) -> Any:
        return function(self) if dim is None else function(self, dim, keepdim)

    return run


def _std_var(function: Callable[..., Any]) -> Callable[..., Any]:
    def run(
        self: torch.Tensor, dim: Any = None, correction: float = 1, keepdim: bool = False
    ) -> torch.Tensor:
        return function(self, dim, correction=correction, keepdim=keepdim)

    return run


def _rdiv(self: torch.Tensor, other: Any) -> torch.Tensor:
    return torch.reciprocal(self) * other if not isinstance(other, torch.Tensor) else other / self


def _rpow(self: torch.Tensor, other: Any) -> torch.Tensor:
    return torch.pow(other, self)


def _to(self: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return self if dtype is None else self.to(dtype)


def _cast(dtype: torch.dtype) -> Callable[..., Any]:
    return lambda self: self.to(dtype)


def _factory(function: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """zeros / ones / full: ``device`` is the hook's, added by the executor."""

    def run(
        size: list[int], dtype: torch.dtype | None = None, device: Any = None, **rest: Any
    ) -> torch.Tensor:
        return function(size, **rest, dtype=dtype or torch.float32, device=device)

    return run


def _arange(
    start: float, end: float | None = None, step: float = 1, dtype: Any = None, device: Any = None
) -> torch.Tensor:
    if end is None:
        start, end = 0, start
    return torch.arange(start, end, step, dtype=dtype, device=device)


def _like(function: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    def run(self: torch.Tensor, dtype: torch.dtype | None = None, **rest: Any) -> torch.Tensor:
        return function(self, **rest, dtype=dtype)

    return run


def _max_min(values: Callable[..., Any]) -> Callable[..., Any]:
    """max/min with a dim: (values, indices), as torch returns them."""

    def run(self: torch.Tensor, dim: int, keepdim: bool = False) -> tuple[torch.Tensor, ...]:
        result = values(self, dim, keepdim)
        return (result.values, result.indices)

    return run


def _topk(
    self: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> tuple[torch.Tensor, ...]:
    result = torch.topk(self, k, dim, largest, sorted)
    return (result.values, result.indices)


def _sort(self: torch.Tensor, dim: int = -1, descending: bool = False) -> tuple[torch.Tensor, ...]:
    result = torch.sort(self, dim, descending)
    return (result.values, result.indices)


def _pad(self: torch.Tensor, pad: list[int], value: float = 0.0) -> torch.Tensor:
    return F.pad(self, pad, "constant", value)


def _layer_norm(
    self: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return F.layer_norm(self, normalized_shape, weight, bias, eps)


def _softmax(function: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    def run(self: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return function(self, dim, dtype=dtype)

    return run


def _norm(
    self: torch.Tensor, p: float = 2.0, dim: Any = None, keepdim: bool = False
) -> torch.Tensor:
    return torch.linalg.vector_norm(self, p, dim, keepdim)


# --- the table ------------------------------------------------------------------------------


def _unary(name: str, function: Callable[..., Any], cost: str = "elementwise") -> Op:
    return Op(name, (SELF,), _call(function, "self"), cost=cost)


def _binary(name: str, function: Callable[..., Any], first: str = "self") -> Op:
    return Op(name, (Param(first, Kind.TENSOR_OR_NUMBER), OTHER), _call(function, first, "other"))


def _inplace(name: str, method: Callable[..., Any], *params: Param) -> Op:
    return Op(name, (SELF, *params), _kw(method), mutates=True)


_ALPHA = Param("alpha", Kind.NUMBER, 1)

_OPS: list[Op] = [
    # A: indexing and assignment
    Op("getitem", (SELF, Param("index", Kind.INDEX)), _getitem, cost="view"),
    Op(
        "setitem",
        (SELF, Param("index", Kind.INDEX), Param("value", Kind.TENSOR_OR_NUMBER)),
        _setitem,
        mutates=True,
    ),
    Op(
        "index_select",
        (SELF, _dim(), Param("index", Kind.TENSOR)),
        _call(torch.index_select, "self", "dim", "index"),
    ),
    Op(
        "gather",
        (SELF, _dim(), Param("index", Kind.TENSOR)),
        _call(torch.gather, "self", "dim", "index"),
    ),
    Op(
        "take_along_dim",
        (SELF, Param("indices", Kind.TENSOR), _dim("dim", None)),
        _call(torch.take_along_dim, "self", "indices", "dim"),
    ),
    Op(
        "masked_fill",
        (SELF, Param("mask", Kind.TENSOR), Param("value", Kind.TENSOR_OR_NUMBER)),
        _call(torch.masked_fill, "self", "mask", "value"),
    ),
    Op(
        "masked_fill_",
        (SELF, Param("mask", Kind.TENSOR), Param("value", Kind.TENSOR_OR_NUMBER)),
        _call(torch.Tensor.masked_fill_, "self", "mask", "value"),
        mutates=True,
    ),
    Op(
        "where",
        (Param("condition", Kind.TENSOR), Param("self", Kind.TENSOR_OR_NUMBER), OTHER),
        _call(torch.where, "condition", "self", "other"),
    ),
    Op(
        "select",
        (SELF, _dim(), Param("index", Kind.INT)),
        _call(torch.select, "self", "dim", "index"),
        cost="view",
    ),
    Op(
        "narrow",
        (SELF, _dim(), Param("start", Kind.INT), Param("length", Kind.INT)),
        _call(torch.narrow, "self", "dim", "start", "length"),
        cost="view",
    ),
    # B: shapes and views
    Op(
        "view",
        (SELF, Param("size", Kind.SIZE)),
        _call(torch.Tensor.view, "self", "size"),
        cost="view",
    ),
    Op(
        "reshape",
        (SELF, Param("shape", Kind.SIZE)),
        _call(torch.reshape, "self", "shape"),
        cost="view",
    ),
    Op(
        "flatten",
        (SELF, _dim("start_dim", 0), _dim("end_dim", -1)),
        _call(torch.flatten, "self", "start_dim", "end_dim"),
        cost="view",
    ),
    Op(
        "unflatten",
        (SELF, _dim(), Param("sizes", Kind.SIZE)),
        _call(torch.unflatten, "self", "dim", "sizes"),
        cost="view",
    ),
    Op("squeeze", (SELF, Param("dim", Kind.DIMS, OPTIONAL)), _kw(torch.squeeze), cost="view"),
    Op(
        "unsqueeze",
        (SELF, Param("dim", Kind.INT)),
        _call(torch.unsqueeze, "self", "dim"),
        cost="view",
    ),
    Op(
        "permute",
        (SELF, Param("dims", Kind.SIZE)),
        _call(torch.permute, "self", "dims"),
        cost="view",
    ),
    Op(
        "transpose",
        (SELF, _dim("dim0"), _dim("dim1")),
        _call(torch.transpose, "self", "dim0", "dim1"),
        cost="view",
    ),
    Op(
        "movedim",
        (SELF, Param("source", Kind.DIMS), Param("destination", Kind.DIMS)),
        _call(torch.movedim, "self", "source", "destination"),
        cost="view",
    ),
    Op(
        "expand",
        (SELF, Param("size", Kind.SIZE)),
        _call(torch.Tensor.expand, "self", "size"),
        cost="view",
        creates=True,
    ),
    Op(
        "expand_as",
        (SELF, Param("other", Kind.TENSOR)),
        _call(torch.Tensor.expand_as, "self", "other"),
        cost="view",
    ),
    Op(
        "broadcast_to",
        (SELF, Param("size", Kind.SIZE)),
        _call(torch.broadcast_to, "self", "size"),
        cost="view",
        creates=True,
    ),
    Op("contiguous", (SELF,), _call(torch.Tensor.contiguous, "self")),
    Op(
        "diagonal",
        (SELF, Param("offset", Kind.INT, 0), _dim("dim1", 0), _dim("dim2", 1)),
        _call(torch.diagonal, "self", "offset", "dim1", "dim2"),
        cost="view",
    ),
    Op(
        "unbind",
        (SELF, _dim("dim", 0)),
        _call(torch.unbind, "self", "dim"),
        outputs=-1,
        cost="view",
    ),
    Op(
        "split",
        (SELF, Param("split_size", Kind.DIMS), _dim("dim", 0)),
        _call(torch.split, "self", "split_size", "dim"),
        outputs=-1,
        cost="view",
    ),
    Op(
        "chunk",
        (SELF, Param("chunks", Kind.INT), _dim("dim", 0)),
        _call(torch.chunk, "self", "chunks", "dim"),
        outputs=-1,
        cost="view",
    ),
    Op("flip", (SELF, Param("dims", Kind.DIMS)), _call(torch.flip, "self", "dims")),
    Op(
        "roll",
        (SELF, Param("shifts", Kind.DIMS), Param("dims", Kind.DIMS, OPTIONAL)),
        _kw(torch.roll),
    ),
    Op(
        "repeat",
        (SELF, Param("repeats", Kind.SIZE)),
        _call(torch.Tensor.repeat, "self", "repeats"),
        creates=True,
    ),
    Op("cat", (Param("tensors", Kind.TENSORS), _dim("dim", 0)), _call(torch.cat, "tensors", "dim")),
    Op(
        "stack",
        (Param("tensors", Kind.TENSORS), _dim("dim", 0)),
        _call(torch.stack, "tensors", "dim"),
    ),
    Op(
        "pad", (SELF, Param("pad", Kind.SIZE), Param("value", Kind.NUMBER, 0.0)), _pad, creates=True
    ),
    Op("tril", (SELF, Param("diagonal", Kind.INT, 0)), _call(torch.tril, "self", "diagonal")),
    Op("triu", (SELF, Param("diagonal", Kind.INT, 0)), _call(torch.triu, "self", "diagonal")),
    Op("clone", (SELF,), _call(torch.clone, "self")),
    Op("detach", (SELF,), _call(torch.Tensor.detach, "self"), cost="view"),
    Op("to", (SELF, _dtype()), _to),
    Op("float", (SELF,), _cast(torch.float32)),
    Op("double", (SELF,), _cast(torch.float64)),
    Op("half", (SELF,), _cast(torch.float16)),
    Op("bfloat16", (SELF,), _cast(torch.bfloat16)),
    Op("long", (SELF,), _cast(torch.int64)),
    Op("int", (SELF,), _cast(torch.int32)),
    Op("bool", (SELF,), _cast(torch.bool)),
    # C: elementwise arithmetic and comparisons
    Op(
        "add",
        (Param("self", Kind.TENSOR_OR_NUMBER), OTHER, _ALPHA),
        lambda self, other, alpha: torch.add(self, other, alpha=alpha),
    ),
    Op(
        "sub",
        (Param("self", Kind.TENSOR_OR_NUMBER), OTHER, _ALPHA),
        lambda self, other, alpha: torch.sub(self, other, alpha=alpha),
    ),
    _binary("mul", torch.mul),
    Op(
        "div",
        (
            Param("self", Kind.TENSOR_OR_NUMBER),
            OTHER,
            Param("rounding_mode", Kind.CHOICE, OPTIONAL, ("trunc", "floor")),
        ),
        lambda self, other, rounding_mode: torch.div(self, other, rounding_mode=rounding_mode),
    ),
    Op(
        "rsub",
        (SELF, OTHER, _ALPHA),
        lambda self, other, alpha: torch.rsub(self, other, alpha=alpha),
    ),
    _binary("rdiv", _rdiv),
    _binary("floor_divide", torch.floor_divide),
    _binary("remainder", torch.remainder),
    Op(
        "pow",
        (Param("self", Kind.TENSOR_OR_NUMBER), Param("exponent", Kind.TENSOR_OR_NUMBER)),
        _call(torch.pow, "self", "exponent"),
    ),
    _binary("rpow", _rpow),
    _binary("maximum", torch.maximum),
    _binary("minimum", torch.minimum),
    Op(
        "lerp",
        (SELF, Param("end", Kind.TENSOR), Param("weight", Kind.TENSOR_OR_NUMBER)),
        _call(torch.lerp, "self", "end", "weight"),
    ),
    Op(
        "clamp",
        (
            SELF,
            Param("min", Kind.TENSOR_OR_NUMBER, OPTIONAL),
            Param("max", Kind.TENSOR_OR_NUMBER, OPTIONAL),
        ),
        _call(torch.clamp, "self", "min", "max"),
    ),
    Op(
        "nan_to_num",
        (
            SELF,
            Param("nan", Kind.NUMBER, 0.0),
            Param("posinf", Kind.NUMBER, OPTIONAL),
            Param("neginf", Kind.NUMBER, OPTIONAL),
        ),
        _call(torch.nan_to_num, "self", "nan", "posinf", "neginf"),
    ),
    *(
        _binary(name, function)
        for name, function in (
            ("eq", torch.eq),
            ("ne", torch.ne),
            ("lt", torch.lt),
            ("le", torch.le),
            ("gt", torch.gt),
            ("ge", torch.ge),
            ("logical_and", torch.logical_and),
            ("logical_or", torch.logical_or),
            ("logical_xor", torch.logical_xor),
            ("bitwise_and", torch.bitwise_and),
            ("bitwise_or", torch.bitwise_or),
        )
    ),
    *(
        _unary(name, function)
        for name, function in (
            ("neg", torch.neg),
            ("abs", torch.abs),
            ("sqrt", torch.sqrt),
            ("rsqrt", torch.rsqrt),
            ("exp", torch.exp),
            ("log", torch.log),
            ("log1p", torch.log1p),
            ("sign", torch.sign),
            ("reciprocal", torch.reciprocal),
            ("round", torch.round),
            ("floor", torch.floor),
            ("ceil", torch.ceil),
            ("logical_not", torch.logical_not),
            ("isnan", torch.isnan),
            ("isinf", torch.isinf),
            ("isfinite", torch.isfinite),
            ("square", torch.square),
            ("relu", torch.relu),
            ("silu", F.silu),
            ("sigmoid", torch.sigmoid),
            ("tanh", torch.tanh),
            ("softplus", F.softplus),
            ("sin", torch.sin),
            ("cos", torch.cos),
        )
    ),
    # in place (x += 1, x.zero_(), x.copy_(y), …)
    _inplace("add_", torch.Tensor.add_, OTHER, _ALPHA),
    _inplace("sub_", torch.Tensor.sub_, OTHER, _ALPHA),
    _inplace("mul_", torch.Tensor.mul_, OTHER),
    _inplace("div_", torch.Tensor.div_, OTHER),
    _inplace(
        "clamp_",
        torch.Tensor.clamp_,
        Param("min", Kind.TENSOR_OR_NUMBER, OPTIONAL),
        Param("max", Kind.TENSOR_OR_NUMBER, OPTIONAL),
    ),
    _inplace("zero_", torch.Tensor.zero_),
    _inplace("fill_", torch.Tensor.fill_, Param("value", Kind.TENSOR_OR_NUMBER)),
    Op(  # positional: torch's own keyword for ``src`` is ``other``
        "copy_",
        (SELF, Param("src", Kind.TENSOR)),
        _call(torch.Tensor.copy_, "self", "src"),
        mutates=True,
    ),
    _inplace("neg_", torch.Tensor.neg_),
    _inplace("relu_", torch.Tensor.relu_),
    # D: activations and norms
    Op(
        "gelu",
        (SELF, Param("approximate", Kind.CHOICE, "none", ("none", "tanh"))),
        lambda self, approximate: F.gelu(self, approximate=approximate),
    ),
    Op("softmax", (SELF, _dim(), _dtype()), _softmax(torch.softmax)),
    Op("log_softmax", (SELF, _dim(), _dtype()), _softmax(torch.log_softmax)),
    Op(
        "layer_norm",
        (
            SELF,
            Param("normalized_shape", Kind.SIZE),
            Param("weight", Kind.TENSOR, OPTIONAL),
            Param("bias", Kind.TENSOR, OPTIONAL),
            Param("eps", Kind.NUMBER, 1e-5),
        ),
        _layer_norm,
    ),
    Op(
        "normalize",
        (SELF, Param("p", Kind.NUMBER, 2.0), _dim("dim", 1), Param("eps", Kind.NUMBER, 1e-12)),
        _call(F.normalize, "self", "p", "dim", "eps"),
    ),
    Op(
        "cosine_similarity",
        (
            Param("x1", Kind.TENSOR),
            Param("x2", Kind.TENSOR),
            _dim("dim", 1),
            Param("eps", Kind.NUMBER, 1e-8),
        ),
        _call(F.cosine_similarity, "x1", "x2", "dim", "eps"),
    ),
    # E: reductions
    Op("sum", (SELF, Param("dim", Kind.DIMS, None), _keepdim(), _dtype()), _reduce(torch.sum)),
    Op("mean", (SELF, Param("dim", Kind.DIMS, None), _keepdim(), _dtype()), _reduce(torch.mean)),
    Op("prod", (SELF, Param("dim", Kind.DIM, None), _keepdim()), _reduce(torch.prod)),
    Op("amax", (SELF, Param("dim", Kind.DIMS, None), _keepdim()), _reduce(torch.amax)),
    Op("amin", (SELF, Param("dim", Kind.DIMS, None), _keepdim()), _reduce(torch.amin)),
    Op("max", (SELF,), _call(torch.max, "self")),
    Op("min", (SELF,), _call(torch.min, "self")),
    Op("max_dim", (SELF, _dim(), _keepdim()), _max_min(torch.max), outputs=2),
    Op("min_dim", (SELF, _dim(), _keepdim()), _max_min(torch.min), outputs=2),
    Op("argmax", (SELF, Param("dim", Kind.DIM, None), _keepdim()), _with_dim_or_all(torch.argmax)),
    Op("argmin", (SELF, Param("dim", Kind.DIM, None), _keepdim()), _with_dim_or_all(torch.argmin)),
    Op(
        "std",
        (SELF, Param("dim", Kind.DIMS, None), Param("correction", Kind.NUMBER, 1), _keepdim()),
        _std_var(torch.std),
    ),
    Op(
        "var",
        (SELF, Param("dim", Kind.DIMS, None), Param("correction", Kind.NUMBER, 1), _keepdim()),
        _std_var(torch.var),
    ),
    Op(
        "norm",
        (SELF, Param("p", Kind.NUMBER, 2.0), Param("dim", Kind.DIMS, None), _keepdim()),
        _norm,
    ),
    Op(
        "logsumexp",
        (SELF, Param("dim", Kind.DIMS), _keepdim()),
        _call(torch.logsumexp, "self", "dim", "keepdim"),
    ),
    Op("cumsum", (SELF, _dim(), _dtype()), _kw(torch.cumsum)),
    Op("all", (SELF, Param("dim", Kind.DIM, None), _keepdim()), _with_dim_or_all(torch.all)),
    Op("any", (SELF, Param("dim", Kind.DIM, None), _keepdim()), _with_dim_or_all(torch.any)),
    Op("count_nonzero", (SELF, Param("dim", Kind.DIMS, OPTIONAL)), _kw(torch.count_nonzero)),
    Op(
        "topk",
        (
            SELF,
            Param("k", Kind.INT),
            _dim("dim", -1),
            Param("largest", Kind.BOOL, True),
            Param("sorted", Kind.BOOL, True),
        ),
        _topk,
        outputs=2,
        cost="sort",
    ),
    Op(
        "sort",
        (SELF, _dim("dim", -1), Param("descending", Kind.BOOL, False)),
        _sort,
        outputs=2,
        cost="sort",
    ),
    Op(
        "argsort",
        (SELF, _dim("dim", -1), Param("descending", Kind.BOOL, False)),
        _call(torch.argsort, "self", "dim", "descending"),
        cost="sort",
    ),
    # F: linear algebra
    Op(
        "matmul",
        (SELF, Param("other", Kind.TENSOR)),
        _call(torch.matmul, "self", "other"),
        cost="matmul",
    ),
    Op("mm", (SELF, Param("mat2", Kind.TENSOR)), _call(torch.mm, "self", "mat2"), cost="matmul"),
    Op("bmm", (SELF, Param("mat2", Kind.TENSOR)), _call(torch.bmm, "self", "mat2"), cost="matmul"),
    Op(
        "outer",
        (SELF, Param("vec2", Kind.TENSOR)),
        _call(torch.outer, "self", "vec2"),
        cost="matmul",
    ),
    Op(
        "dot", (SELF, Param("other", Kind.TENSOR)), _call(torch.dot, "self", "other"), cost="matmul"
    ),
    Op(
        "linear",
        (SELF, Param("weight", Kind.TENSOR), Param("bias", Kind.TENSOR, OPTIONAL)),
        _call(F.linear, "self", "weight", "bias"),
        cost="matmul",
    ),
    Op(
        "einsum",
        (Param("equation", Kind.EQUATION), Param("operands", Kind.TENSORS)),
        lambda equation, operands: torch.einsum(equation, *operands),
        cost="einsum",
    ),
    # G: creation (on the hook's device, with the graph's own values: never uninitialised)
    Op("zeros", (Param("size", Kind.SIZE), _dtype()), _factory(torch.zeros), creates=True),
    Op("ones", (Param("size", Kind.SIZE), _dtype()), _factory(torch.ones), creates=True),
    Op(
        "full",
        (Param("size", Kind.SIZE), Param("fill_value", Kind.NUMBER), _dtype()),
        _factory(torch.full),
        creates=True,
    ),
    Op(
        "arange",
        (
            Param("start", Kind.NUMBER),
            Param("end", Kind.NUMBER, OPTIONAL),
            Param("step", Kind.NUMBER, 1),
            _dtype(),
        ),
        _arange,
        creates=True,
    ),
    Op("zeros_like", (SELF, _dtype()), _like(torch.zeros_like)),
    Op("ones_like", (SELF, _dtype()), _like(torch.ones_like)),
    Op("full_like", (SELF, Param("fill_value", Kind.NUMBER), _dtype()), _like(torch.full_like)),
]

OPS: dict[str, Op] = {op.name: op for op in _OPS}
assert len(OPS) == len(_OPS), "an op is declared twice"

# Factories take the device of the activation they run beside.
DEVICE_OPS = frozenset(name for name in ("zeros", "ones", "full", "arange"))

EINSUM_MAX_OPERANDS = 4
EINSUM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,-> ")
EINSUM_MAX_LENGTH = 64


def size_product(sizes: list[int]) -> int:
    return math.prod(abs(size) for size in sizes)
