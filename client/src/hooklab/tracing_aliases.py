"""How each torch spelling a hook function may use maps onto an op of the opset.

``x + 1``, ``x.add(1)``, ``torch.add(x, 1)`` and ``x.__radd__(1)`` are one op (``add``); this
table binds each spelling's arguments to the op's parameter names. A spelling absent here is
not traced (the function falls back to a callback, naming the call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hooklab_proto import OPS

# Keyword arguments that change nothing the server computes.
_IGNORED_KWARGS = frozenset(
    {
        "memory_format",
        "_stacklevel",
        "device",
        "layout",
        "pin_memory",
        "non_blocking",
        "copy",
        "requires_grad",
        "inplace",
    }
)
# Renamings of torch's keyword names onto the op's parameter names.
_RENAMES = {"input": "self", "ord": "p", "axis": "dim", "out_dtype": "dtype"}


class BindError(Exception):
    pass


@dataclass(frozen=True)
class Binding:
    """One spelling: the op it means, and the names of its positional arguments (by default
    the op's own parameter order). ``varargs``: the positional arguments from that index on
    form one list (``x.view(2, 3)``, ``torch.zeros(2, 3)``). ``swap``: a reflected operator
    (``2 - x`` arrives as ``x.__rsub__(2)``)."""

    op: str
    positional: tuple[str, ...] = ()
    varargs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    custom: Callable[[Sequence[Any], dict[str, Any]], tuple[str, dict[str, Any]]] | None = None

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.custom is not None:
            return self.custom(args, kwargs)
        names = self.positional or tuple(param.name for param in OPS[self.op].params)
        args = list(args)
        if self.varargs is not None and len(args) > self.varargs:
            rest = args[self.varargs :]
            single = len(rest) == 1 and isinstance(rest[0], list | tuple | torch.Size)
            args = [*args[: self.varargs], list(rest[0]) if single else rest]
        if len(args) > len(names):
            raise BindError(f"{self.op} got {len(args)} positional arguments")
        named: dict[str, Any] = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key in _IGNORED_KWARGS:
                continue
            named[_RENAMES.get(key, key)] = value
        named.update(self.extra)
        return self.op, named


def _same(op: str, *spellings: Any, **options: Any) -> dict[Any, Binding]:
    return {spelling: Binding(op, **options) for spelling in spellings if spelling is not None}


def _method_and_function(op: str, **options: Any) -> dict[Any, Binding]:
    return _same(op, getattr(torch.Tensor, op, None), getattr(torch, op, None), **options)


def _max_min(name: str) -> Callable[[Sequence[Any], dict[str, Any]], tuple[str, dict[str, Any]]]:
    """max(x) / max(x, dim, keepdim) / max(x, other): three ops behind one name."""

    def bind(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        kwargs = {_RENAMES.get(k, k): v for k, v in kwargs.items()}
        self, rest = (args[0], list(args[1:])) if args else (kwargs.pop("self"), [])
        other = rest[0] if rest else kwargs.pop("other", None)
        if isinstance(other, torch.Tensor):
            return ("maximum" if name == "max" else "minimum"), {"self": self, "other": other}
        dim = other if rest else kwargs.pop("dim", None)
        if dim is None:
            return name, {"self": self}
        keepdim = rest[1] if len(rest) > 1 else kwargs.pop("keepdim", False)
        return f"{name}_dim", {"self": self, "dim": dim, "keepdim": keepdim}

    return bind


def _to(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """x.to(dtype), x.to(device), x.to(other), x.to(device, dtype): only the dtype matters."""
    dtype = kwargs.get("dtype")
    for value in args[1:]:
        if isinstance(value, torch.dtype):
            dtype = value
        elif isinstance(value, torch.Tensor):
            dtype = value.dtype
    return "to", {"self": args[0], "dtype": dtype}


def _type_as(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    other = args[1] if len(args) > 1 else kwargs["other"]
    return "to", {"self": args[0], "dtype": other.dtype}


def _einsum(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    return "einsum", {"equation": equation, "operands": operands}


def _softmax(op: str) -> Callable[[Sequence[Any], dict[str, Any]], tuple[str, dict[str, Any]]]:
    def bind(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        named = {_RENAMES.get(k, k): v for k, v in kwargs.items() if k != "_stacklevel"}
        names = ("self", "dim", "_stacklevel", "dtype")
        named.update({n: v for n, v in zip(names, args, strict=False) if n != "_stacklevel"})
        return op, named

    return bind


def _norm(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """x.norm(p="fro", dim, keepdim): the Frobenius norm is the 2-norm over the dims."""
    _, named = Binding("norm").bind(args, kwargs)
    if named.get("p") in ("fro", None):
        named["p"] = 2.0
    return "norm", named


def _pad(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    _, named = Binding("pad", positional=("self", "pad", "mode", "value")).bind(args, kwargs)
    if named.pop("mode", "constant") != "constant":
        raise BindError("only constant padding is supported")
    return "pad", named


def _functional(op: str) -> Callable[[Sequence[Any], dict[str, Any]], tuple[str, dict[str, Any]]]:
    """F.relu(x, inplace=True) edits x: the in-place op, where the opset has one."""

    def bind(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        inplace = bool(kwargs.get("inplace", False)) or (len(args) > 1 and bool(args[1]))
        if not inplace:
            return Binding(op, positional=("self",)).bind(args[:1], kwargs)
        if f"{op}_" not in OPS:
            raise BindError(f"in-place {op} is not in the opset; use inplace=False")
        return f"{op}_", {"self": args[0] if args else kwargs["input"]}

    return bind


def _transpose_last(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "transpose", {"self": args[0], "dim0": -2, "dim1": -1}


def _transpose_2d(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "transpose", {"self": args[0], "dim0": 0, "dim1": -1 if args[0].dim() > 1 else 0}


T = torch.Tensor


def getter(name: str) -> Any:
    """The function a tensor property read arrives as (``torch.Tensor.shape.__get__``)."""
    return getattr(T, name).__get__


ALIASES: dict[Any, Binding] = {
    # indexing
    **_same("getitem", T.__getitem__),
    **_same("setitem", T.__setitem__),
    **_method_and_function("index_select"),
    **_method_and_function("gather"),
    **_method_and_function("take_along_dim"),
    **_method_and_function("masked_fill"),
    **_same("masked_fill_", T.masked_fill_),
    **_same("where", torch.where),
    **_same("where", T.where, positional=("self", "condition", "other")),
    **_method_and_function("select"),
    **_method_and_function("narrow"),
    # shapes
    **_same("view", T.view, varargs=1),
    **_same("reshape", T.reshape, varargs=1),
    **_same("reshape", torch.reshape),
    **_method_and_function("flatten"),
    **_method_and_function("unflatten"),
    **_method_and_function("squeeze"),
    **_method_and_function("unsqueeze"),
    **_same("permute", T.permute, varargs=1),
    **_same("permute", torch.permute),
    **_method_and_function("transpose"),
    **_same("transpose", T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims),
    **_same("transpose", getter("T"), T.t, torch.t, custom=_transpose_2d),
    **_same("transpose", getter("mT"), custom=_transpose_last),
    **_method_and_function("movedim"),
    **_same("expand", T.expand, varargs=1),
    **_same("expand_as", T.expand_as),
    **_method_and_function("broadcast_to"),
    **_same("contiguous", T.contiguous),
    **_method_and_function("diagonal"),
    **_method_and_function("unbind"),
    **_method_and_function("split"),
    **_method_and_function("chunk"),
    **_same("flip", T.flip, varargs=1),  # x.flip(0), x.flip(0, 1), x.flip((0, 1))
    **_same("flip", torch.flip),
    **_method_and_function("roll"),
    **_same("repeat", T.repeat, varargs=1),
    **_same("cat", torch.cat, torch.concat, torch.concatenate),
    **_same("stack", torch.stack),
    **_same("pad", F.pad, custom=_pad),
    **_method_and_function("tril"),
    **_method_and_function("triu"),
    **_method_and_function("clone"),
    **_method_and_function("detach"),
    **_same("to", T.to, custom=_to),
    **_same("to", T.type_as, custom=_type_as),
    **{
        getattr(T, name): Binding(name)
        for name in ("float", "double", "half", "bfloat16", "long", "int", "bool")
    },
    # arithmetic
    **_same("add", T.add, torch.add, T.__add__, T.__radd__),
    **_same("sub", T.sub, torch.sub, T.subtract, torch.subtract, T.__sub__),
    **_same("rsub", T.__rsub__),
    **_same("mul", T.mul, torch.mul, T.multiply, torch.multiply, T.__mul__, T.__rmul__),
    **_same("div", T.div, torch.div, T.divide, torch.divide, T.true_divide, T.__truediv__),
    **_same("rdiv", T.__rtruediv__),
    **_same("floor_divide", T.floor_divide, torch.floor_divide, T.__floordiv__),
    **_same("remainder", T.remainder, torch.remainder, T.__mod__),
    **_same("pow", T.pow, torch.pow, T.__pow__),
    **_same("rpow", T.__rpow__),
    **_method_and_function("maximum"),
    **_method_and_function("minimum"),
    **_method_and_function("lerp"),
    **_same("clamp", T.clamp, torch.clamp, T.clip, torch.clip),
    **_method_and_function("nan_to_num"),
    **_same("eq", T.eq, torch.eq, T.__eq__),
    **_same("ne", T.ne, torch.ne, T.__ne__),
    **_same("lt", T.lt, torch.lt, T.__lt__),
    **_same("le", T.le, torch.le, T.__le__),
    **_same("gt", T.gt, torch.gt, T.__gt__),
    **_same("ge", T.ge, torch.ge, T.__ge__),
    **_same("logical_and", T.logical_and, torch.logical_and),
    **_same("logical_or", T.logical_or, torch.logical_or),
    **_same("logical_xor", T.logical_xor, torch.logical_xor),
    **_same("bitwise_and", T.bitwise_and, torch.bitwise_and, T.__and__),
    **_same("bitwise_or", T.bitwise_or, torch.bitwise_or, T.__or__),
    **_same("logical_not", T.logical_not, torch.logical_not, T.__invert__),
    **_same("neg", T.neg, torch.neg, T.negative, T.__neg__),
    **_same("abs", T.abs, torch.abs, T.__abs__),
    **{
        spelling: Binding(name)
        for name in (
            "sqrt",
            "rsqrt",
            "exp",
            "log",
            "log1p",
            "sign",
            "reciprocal",
            "round",
            "floor",
            "ceil",
            "isnan",
            "isinf",
            "isfinite",
            "square",
            "sigmoid",
            "tanh",
            "sin",
            "cos",
        )
        for spelling in (getattr(T, name), getattr(torch, name))
    },
    **_same("relu", T.relu, torch.relu),
    **_same("relu", F.relu, custom=_functional("relu")),
    **_same("silu", F.silu, custom=_functional("silu")),
    **_same("sigmoid", F.sigmoid),
    **_same("tanh", F.tanh),
    **_same("softplus", F.softplus, positional=("self",)),
    # in place
    **_same("add_", T.add_, T.__iadd__),
    **_same("sub_", T.sub_, T.__isub__),
    **_same("mul_", T.mul_, T.__imul__),
    **_same("div_", T.div_, T.__itruediv__),
    **_same("clamp_", T.clamp_),
    **_same("zero_", T.zero_),
    **_same("fill_", T.fill_),
    **_same("copy_", T.copy_),
    **_same("neg_", T.neg_),
    **_same("relu_", T.relu_),
    # activations and norms
    **_same("gelu", F.gelu),
    **_same("softmax", T.softmax, torch.softmax, F.softmax, custom=_softmax("softmax")),
    **_same(
        "log_softmax",
        T.log_softmax,
        torch.log_softmax,
        F.log_softmax,
        custom=_softmax("log_softmax"),
    ),
    **_same("layer_norm", F.layer_norm),
    **_same("normalize", F.normalize),
    **_same("cosine_similarity", F.cosine_similarity, torch.cosine_similarity),
    # reductions
    **_method_and_function("sum"),
    **_method_and_function("mean"),
    **_method_and_function("prod"),
    **_method_and_function("amax"),
    **_method_and_function("amin"),
    **_same("max", T.max, torch.max, custom=_max_min("max")),
    **_same("min", T.min, torch.min, custom=_max_min("min")),
    **_method_and_function("argmax"),
    **_method_and_function("argmin"),
    **_method_and_function("std"),
    **_method_and_function("var"),
    **_same("norm", T.norm, torch.norm, torch.linalg.vector_norm, custom=_norm),
    **_method_and_function("logsumexp"),
    **_method_and_function("cumsum"),
    **_method_and_function("all"),
    **_method_and_function("any"),
    **_method_and_function("count_nonzero"),
    **_method_and_function("topk"),
    **_method_and_function("sort"),
    **_method_and_function("argsort"),
    # linear algebra
    **_same("matmul", T.matmul, torch.matmul, T.__matmul__),
    **_method_and_function("mm"),
    **_method_and_function("bmm"),
    **_same("outer", T.outer, torch.outer, T.ger, torch.ger),
    **_method_and_function("dot"),
    **_same("linear", F.linear),
    **_same("einsum", torch.einsum, custom=_einsum),
    # creation
    **_same("zeros", torch.zeros, varargs=0),
    **_same("ones", torch.ones, varargs=0),
    **_same("full", torch.full),
    **_same("arange", torch.arange),
    **_same("zeros_like", torch.zeros_like),
    **_same("ones_like", torch.ones_like),
    **_same("full_like", torch.full_like),
}
# ``__rmatmul__``: ``a @ x`` with ``a`` captured.
ALIASES[T.__rmatmul__] = Binding(
    "matmul", custom=lambda args, kwargs: ("matmul", {"self": args[1], "other": args[0]})
)

# Reads of metadata, not values: answered from the stand-in.
PROPERTY_READS = frozenset(
    {
        getter("shape"),
        getter("dtype"),
        getter("device"),
        getter("ndim"),
        getter("is_cuda"),
        getter("requires_grad"),
        getter("is_leaf"),
        T.size,
        T.dim,
        T.numel,
        T.__len__,
        T.element_size,
        T.is_floating_point,
        T.is_complex,
        getter("layout"),
        getter("T"),
        getter("mT"),
        T.ndimension,
        T.nelement,
        getter("grad_fn"),
        T.is_contiguous,
        T.stride,
        T.storage_offset,
        getter("is_meta"),
        T.__hash__,
    }
)

# Reads of values: the reason each gives for running the function on the client.
VALUE_READS: dict[Any, str] = {
    **dict.fromkeys((T.__bool__,), "value-branch"),
    **dict.fromkeys(
        (
            T.item,
            T.tolist,
            T.numpy,
            T.__int__,
            T.__float__,
            T.__index__,
            T.__array__,
            T.__complex__,
            T.cpu,
            T.cuda,
        ),
        "scalar-read",
    ),
    **dict.fromkeys((T.__repr__, T.__format__, T.__str__), "prints-values"),
}
