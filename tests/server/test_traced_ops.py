"""Every op of ``hooklab-ops/1``, spelled the ways users write it, traced by the client, sent
over the wire and run by the server, equal to eager torch.

Each case is a hook function ``fn(x, hook)`` (a closure over captured constants where it needs
them). For random inputs (hypothesis: shapes, values with NaN/inf/ties, dtypes) the function is

1. traced with the client's ``trace`` on the input's shape and dtype;
2. encoded the way the client sends it (msgpack via ``_transport._encoder``; some cases also as
   JSON with JSON tensors), decoded and validated into proto's ``GraphSpec`` under the server's
   limits (``limits_context``);
3. compiled by the server (``compile_graph``: binding, pre-sizing, meta replay, index checks);
4. run on a copy of the real tensor.

The reference is the same function called eagerly on another copy: the returned tensor (the
activation itself when it returns None) and the activation afterwards (in-place edits) must be
bit-exact on CPU, NaN positions included. The server's meta replay must predict every node's
real shape and dtype. ``test_every_op_has_a_case`` fails when an op of the table is not used by
any case's graph.

The second half checks what must not trace (the ``Untraceable`` reason codes), constant folding
(a slice of a captured tensor uploads only the slice), closures/partials, and graphs made
generic over an axis.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import einops
import msgspec
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from hooklab._transport import _encoder
from hooklab.tracing import FOLD_ELEMENTS, StandInHook, Untraceable, trace
from hooklab_proto import OPS, Graph, GraphSpec, limits_context, tensor_to_json
from hooklab_proto._opset import DEVICE_OPS
from hooklab_server.auth import Account
from hooklab_server.metrics import Metrics
from hooklab_server.ops.context import OpsContext
from hooklab_server.ops.errors import RequestError
from hooklab_server.ops.graphs import CompiledGraph, _resolve, compile_graph
from hooklab_server.settings import Settings
from hooklab_server.store import MemoryStore

HOOK = "blocks.1.hook_resid_pre"
WHERE = "hooks[0].graphs[0]"
SETTINGS = Settings()
# compile_graph reads the settings, inline constants and stored caches; it never touches the
# model, so none is loaded.
CTX = OpsContext(
    model=cast(Any, None),
    store=MemoryStore(max_bytes=2**30, ttl_s=600),
    settings=SETTINGS,
    metrics=Metrics(),
    caller=Account("tests"),
)

HookFn = Callable[..., Any]
Builder = Callable[[torch.Tensor, torch.Generator], HookFn]


# --- the pipeline --------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor_to_json(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def over_the_wire(graph: dict[str, Any], encoding: str = "msgpack") -> Graph:
    """The graph as the server sees it: encoded as the client sends it, decoded, validated."""
    spec = {"hook": HOOK, "op": "graph", "graphs": [graph]}
    if encoding == "msgpack":
        data = msgspec.msgpack.decode(_encoder.encode(spec))
    else:  # non-finite literals must already be tagged: plain JSON has no NaN
        data = json.loads(json.dumps(_jsonable(spec), allow_nan=False))
    validated = GraphSpec.model_validate(data, context=limits_context(SETTINGS.limits()))
    return validated.graphs[0]


def compiled_for(
    graph: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, encoding: str = "msgpack"
) -> CompiledGraph:
    compiled, _ = compile_graph(CTX, over_the_wire(graph, encoding), WHERE, shape, dtype)
    return compiled


def assert_exact(actual: Any, expected: Any, what: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _tensors(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


def assert_meta_predicts(compiled: CompiledGraph, x: torch.Tensor) -> None:
    """Each node's result replayed on meta (what validation infers) has the shape and dtype it
    has on the real activation."""
    slots: dict[str, list[Any]] = {}
    for device, activation in (("meta", x.to("meta")), ("real", x.clone())):
        consts = [const.to(activation.device) for const in compiled.consts]
        results: list[Any] = []
        for node in compiled.nodes:
            args = {k: _resolve(v, activation, consts, results) for k, v in node.args.items()}
            if node.op.name in DEVICE_OPS:
                args["device"] = activation.device
            result = node.op.run(**args)
            results.append(tuple(result) if isinstance(result, list | tuple) else result)
        slots[device] = results
    for number, (meta, real) in enumerate(zip(slots["meta"], slots["real"], strict=True)):
        for m, r in zip(_tensors(meta), _tensors(real), strict=True):
            op = compiled.nodes[number].op.name
            assert (m.shape, m.dtype) == (r.shape, r.dtype), f"node {number} ({op})"


def check(fn: HookFn, x: torch.Tensor, encoding: str = "msgpack") -> dict[str, Any]:
    """Trace, send, compile and run ``fn`` on ``x``; compare with eager. The traced graph."""
    traced = trace(fn, HOOK, tuple(x.shape), x.dtype)
    compiled = compiled_for(traced.graph, tuple(x.shape), x.dtype, encoding)

    eager_x = x.clone()
    returned = fn(eager_x, hook=StandInHook(HOOK))
    expected = eager_x if returned is None else returned
    served_x = x.clone()
    out = compiled.run(served_x)
    actual = served_x if out is None else out

    assert_exact(actual, expected.to(x.dtype), "the hook's result")
    assert_exact(served_x, eager_x, "the activation after the hook")
    assert_meta_predicts(compiled, x)
    return traced.graph


# --- inputs --------------------------------------------------------------------------------------


SPECIALS = (math.nan, math.inf, -math.inf, -0.0)


def values(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ints":  # small integers: ties, exact halves, zeros
        return torch.randint(-4, 5, shape, generator=g).to(dtype)
    x = torch.randn(shape, generator=g) * 2
    if kind == "positive":
        x = x.abs() + 0.125
    elif kind == "special" and x.numel():
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (min(4, flat.numel()),), generator=g)
        for pick, special in zip(picks.tolist(), SPECIALS, strict=False):
            flat[pick] = special
    return x.to(dtype)


def const(x: torch.Tensor, g: torch.Generator, *shape: int, dtype: Any = None) -> torch.Tensor:
    """A captured tensor (a steering vector, a clean activation), random, of ``shape``."""
    return torch.randn(shape or tuple(x.shape), generator=g).to(dtype or x.dtype)


def index_const(g: torch.Generator, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g)


# --- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A hook function as a user writes it. ``fn`` needs nothing captured; ``build(x, g)``
    makes one with constants fitting ``x`` (random from ``g``)."""

    name: str
    fn: HookFn | None = None
    build: Builder | None = None
    rank: tuple[int, int] = (3, 3)  # smallest and largest rank of the activation
    low: int = 1  # smallest size of each axis
    kinds: tuple[str, ...] = ("normal", "special", "ints")
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    json: bool = False  # also send it as JSON

    def hook(self, x: torch.Tensor, seed: int) -> HookFn:
        if self.build is not None:
            return self.build(x, torch.Generator().manual_seed(seed + 1))
        assert self.fn is not None
        return self.fn


FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BIG = FOLD_ELEMENTS + 1  # a factory this large is sent as an op, not folded to a constant
FINITE = ("normal", "ints")


def _setitem_slice(x: torch.Tensor, hook: Any) -> torch.Tensor:
    x[:, 0] = 0.0
    return x


def _setitem_none(x: torch.Tensor, hook: Any) -> None:
    x[..., -1] = -1.5


def _setitem_from_self(x: torch.Tensor, hook: Any) -> None:
    x[:, [0, -1]] = x[:, [-1, 0]].clone()


def _setitem_mask(x: torch.Tensor, hook: Any) -> None:
    x[x > 0.5] = 0.5


def _setitem_dunder(x: torch.Tensor, hook: Any) -> torch.Tensor:
    x.__setitem__((slice(None), slice(1, None)), 2.0)
    return x


def _setitem_new_axis(x: torch.Tensor, hook: Any) -> None:
    x[None, ..., 0] = 3.0


def _none(body: Callable[[torch.Tensor], Any]) -> HookFn:
    """A hook that runs ``body`` for its in-place effect and returns None."""

    def hook_fn(x: torch.Tensor, hook: Any) -> None:
        body(x)

    return hook_fn


def _iadd(x: torch.Tensor, hook: Any) -> None:
    x += 1


def _iadd_rebinds(x: torch.Tensor, hook: Any) -> torch.Tensor:
    x += 1
    x *= 2
    x -= 0.5
    x /= 4
    return x


def _detach_then_write(x: torch.Tensor, hook: Any) -> None:
    x.detach()[:, 0] = 0


def _view_then_write(x: torch.Tensor, hook: Any) -> None:
    flat = x.view(-1)
    flat[::2] = 7.0
    x.transpose(0, -1)[0].mul_(3)


def _write_into_diagonal(x: torch.Tensor, hook: Any) -> None:
    x.diagonal(dim1=-2, dim2=-1).zero_()


def _write_through_unbind(x: torch.Tensor, hook: Any) -> None:
    first, *_ = x.unbind(1)
    first.fill_(4.0)


def _write_then_return_other(x: torch.Tensor, hook: Any) -> torch.Tensor:
    x[:, -1] = 0
    return x * 2


def _write_to_same_dtype(x: torch.Tensor, hook: Any) -> None:
    x.to(x.dtype)[..., 0] = 1.0


def _clone_then_write(x: torch.Tensor, hook: Any) -> torch.Tensor:
    y = x.clone()
    y[:, 0] = 0
    return y


def _chunk_rotate(x: torch.Tensor, hook: Any) -> torch.Tensor:
    parts = x.chunk(2, dim=-1)
    return torch.cat(parts[::-1], dim=-1)


def _split_sizes(x: torch.Tensor, hook: Any) -> torch.Tensor:
    head, tail = x.split([1, x.shape[-1] - 1], dim=-1)
    return torch.cat([tail, head], -1)


def _patch_positions(x: torch.Tensor, hook: Any, pos: int, clean: torch.Tensor) -> None:
    x[:, pos, :] = clean[:, pos, :]


def _patch_head(z: torch.Tensor, hook: Any, head: int, clean: torch.Tensor) -> torch.Tensor:
    z[:, :, head, :] = clean[:, :, head, :]
    return z


def _project_out(x: torch.Tensor, hook: Any, unit: torch.Tensor) -> torch.Tensor:
    return x - (x @ unit)[..., None] * unit


def _layer_from_hook(x: torch.Tensor, hook: Any, scales: torch.Tensor) -> torch.Tensor:
    return x * scales[hook.layer()]


def _einops_mean(x: torch.Tensor, hook: Any) -> torch.Tensor:
    means = einops.reduce(x, "b p d -> b d", "mean")
    return x - einops.repeat(means, "b d -> b p d", p=x.shape[1])


def _loop_over_positions(x: torch.Tensor, hook: Any) -> torch.Tensor:
    out = x.clone()
    for p in range(1, x.shape[1]):
        out[:, p] = out[:, p] + out[:, p - 1]
    return out


class _Probe(torch.nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(d, d, generator=g))
            self.linear.bias.copy_(torch.randn(d, generator=g))
        self.linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def _with_module(x: torch.Tensor, g: torch.Generator) -> HookFn:
    probe = _Probe(x.shape[-1], g).to(x.dtype)
    return lambda x, hook: x + probe(x)


def _captured_gather(x: torch.Tensor, g: torch.Generator) -> HookFn:
    index = index_const(g, x.shape[-1], *x.shape)
    return lambda x, hook: x.gather(-1, index)


def _captured(body: Callable[[torch.Tensor, torch.Tensor], Any], *shape: Any) -> Builder:
    """``body(x, c)`` with ``c`` a captured random tensor of x's shape (or ``shape`` from x)."""

    def build(x: torch.Tensor, g: torch.Generator) -> HookFn:
        dims = tuple(s(x) if callable(s) else s for s in shape)
        c = const(x, g, *dims)
        return lambda x, hook: body(x, c)

    return build


def _over(body: Callable[..., Any], **makers: Callable[..., torch.Tensor]) -> Builder:
    """``body(x, **captured)``: a hook over tensors made (random) for x's shape."""

    def build(x: torch.Tensor, g: torch.Generator) -> HookFn:
        captured = {name: make(x, g) for name, make in makers.items()}
        return lambda x, hook: body(x, **captured)

    return build


def VECTOR(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return const(x, g, x.shape[-1])


def SQUARE(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return const(x, g, x.shape[-1], x.shape[-1])


CASES: list[Case] = [
    # A: indexing and assignment
    Case("getitem: slice and expand", lambda x, hook: x[:, :1].expand_as(x).clone(), json=True),
    Case("getitem: ints, ellipsis, None", lambda x, hook: x + x[0, ..., None, -1]),
    Case("getitem: steps and negatives", lambda x, hook: x + x[:, ::2].sum(1, keepdim=True)),
    Case("getitem: int list", lambda x, hook: x[:, [0] * x.shape[1]] * 0.5, json=True),
    Case(
        "getitem: captured index tensor",
        build=_over(lambda x, i: x[:, i], i=lambda x, g: index_const(g, x.shape[1], x.shape[1])),
    ),
    Case("getitem: __getitem__", lambda x, hook: x.__getitem__((Ellipsis, slice(None))).neg()),
    Case("setitem: slice = 0, returns x", _setitem_slice, json=True),
    Case("setitem: ellipsis, returns None", _setitem_none),
    Case("setitem: from itself (int lists)", _setitem_from_self),
    Case("setitem: boolean mask from x", _setitem_mask),
    Case("setitem: __setitem__", _setitem_dunder),
    Case("setitem: new axis", _setitem_new_axis),
    Case(
        "setitem: captured clean activation, partial",
        build=lambda x, g: partial(_patch_positions, pos=-1, clean=const(x, g)),
        json=True,
    ),
    Case(
        "setitem: head of z, partial",
        build=lambda x, g: partial(_patch_head, head=0, clean=const(x, g)),
        rank=(4, 4),
    ),
    Case(
        "index_select: method and function",
        build=_over(
            lambda x, i: x.index_select(-1, i) + torch.index_select(x, 2, i.flip(0)),
            i=lambda x, g: index_const(g, x.shape[-1], x.shape[-1]),
        ),
    ),
    Case("gather: captured index", build=_captured_gather),
    Case(
        "gather: computed argmax index",
        lambda x, hook: torch.gather(x, -1, x.argmax(-1, keepdim=True)).expand_as(x) - x,
    ),
    Case(
        "take_along_dim: argsort, method and function",
        lambda x, hook: (
            x.take_along_dim(x.argsort(-1), -1)
            + torch.take_along_dim(x, x.argsort(0, descending=True), dim=0)
        ),
    ),
    Case("masked_fill: computed mask", lambda x, hook: x.masked_fill(x < 0, 0.0)),
    Case(
        "masked_fill: function, captured mask, tensor value",
        build=_over(
            lambda x, m: torch.masked_fill(x, m, torch.tensor(-1.0, dtype=x.dtype)),
            m=lambda x, g: const(x, g) > 0,
        ),
    ),
    Case("masked_fill_: in place", lambda x, hook: x.masked_fill_(x > 1, 1.0)),
    Case("where: function with number", lambda x, hook: torch.where(x > 0, x, 0.0)),
    Case("where: method", lambda x, hook: x.where(x.abs() < 1, -x)),
    Case(
        "where: captured other",
        build=_captured(lambda x, c: torch.where(c > 0, x, c)),
        dtypes=FLOATS,
    ),
    Case("select: method and function", lambda x, hook: x - x.select(1, 0).unsqueeze(1)),
    Case("select: torch.select", lambda x, hook: x * torch.select(x, -1, -1)[..., None]),
    Case(
        "narrow: method and function",
        lambda x, hook: torch.cat(
            [x.narrow(-1, 1, x.shape[-1] - 1), torch.narrow(x, -1, 0, 1)], -1
        ),
        low=2,
    ),
    # B: shapes and views
    Case(
        "view: varargs and tuple",
        lambda x, hook: x.view(-1).view(x.shape) * x.view(x.shape[0], -1).view(tuple(x.shape)),
    ),
    Case(
        "reshape: method and function",
        lambda x, hook: torch.reshape(x.reshape(-1, x.shape[-1]), x.shape),
    ),
    Case(
        "flatten/unflatten",
        lambda x, hook: (
            torch.flatten(x).unflatten(0, x.shape) + x.flatten(1).unflatten(1, x.shape[1:])
        ),
    ),
    Case(
        "squeeze/unsqueeze",
        lambda x, hook: (
            x.unsqueeze(0).squeeze(0)
            + torch.unsqueeze(x, -1).squeeze(-1)
            + x[None, None].squeeze((0, 1))
        ),
    ),
    Case("squeeze: all size-1 axes", lambda x, hook: x[None].squeeze().reshape(x.shape)),
    Case(
        "permute: varargs, tuple, function",
        lambda x, hook: (
            x.permute(2, 1, 0).permute((2, 1, 0)) + torch.permute(x, (0, 2, 1)).permute(0, 2, 1)
        ),
    ),
    Case(
        "transpose: method, function, swapaxes, mT",
        lambda x, hook: (
            x.transpose(0, 1).transpose(0, 1) + torch.swapaxes(x, -1, 0).swapdims(0, -1) + x.mT.mT
        ),
    ),
    Case(
        "transpose: .T and .t() on 2-D",
        lambda x, hook: x.T.T + x.t().t() + torch.t(x).t(),
        rank=(2, 2),
    ),
    Case(
        "movedim",
        lambda x, hook: (
            x.movedim(0, -1).movedim(-1, 0)
            + torch.movedim(x, (0, 1), (1, 0)).movedim((1, 0), (0, 1))
        ),
    ),
    Case(
        "expand: varargs and -1",
        lambda x, hook: x[:, :1].expand(-1, x.shape[1], -1) + x[:1].expand(x.shape),
    ),
    Case(
        "expand_as / broadcast_to",
        lambda x, hook: (
            x.mean(0).expand_as(x)
            + torch.broadcast_to(x[..., :1], x.shape)
            + x[:1].broadcast_to(x.shape)
        ),
    ),
    Case("contiguous", lambda x, hook: x.transpose(0, 1).contiguous().transpose(0, 1)),
    Case(
        "diagonal: offsets",
        lambda x, hook: (
            x
            - x.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
            + torch.diagonal(x, 1, 0, 2).sum()
        ),
    ),
    Case(
        "unbind: stack reversed, builtin sum",
        lambda x, hook: (
            torch.stack(x.unbind(0)[::-1]) + cast(torch.Tensor, sum(torch.unbind(x, -1)))[..., None]
        ),
    ),
    Case(
        "split: size, method and function",
        lambda x, hook: (
            torch.cat(torch.split(x, 1, dim=-1)[::-1], -1) + torch.cat(x.split(2, 1), 1)
        ),
    ),
    Case("split: sizes list", _split_sizes, low=2),
    Case("chunk: method", _chunk_rotate),
    Case("chunk: function", lambda x, hook: torch.cat(torch.chunk(x, 3, 1), 1) * 2),
    Case(
        "flip: method and function",
        lambda x, hook: x.flip(0) + torch.flip(x, [0, -1]) + x.flip((1,)),
    ),
    Case(
        "roll: dims, tuples, flattened",
        lambda x, hook: x.roll(1, -1) + torch.roll(x, (1, 2), (0, 1)) + x.roll(3),
    ),
    Case(
        "repeat",
        lambda x, hook: x[:1].repeat(x.shape[0], 1, 1) + x[..., :1].repeat((1, 1, x.shape[-1])),
    ),
    Case(
        "cat: cat, concat, concatenate",
        lambda x, hook: (
            torch.cat([x[:, 1:], x[:, :1]], dim=1)
            + torch.concat((x[:1], x[1:]))
            + torch.concatenate([x], -1)
        ),
    ),
    Case(
        "stack",
        lambda x, hook: torch.stack([x, x * 2], 0).sum(0) + torch.stack((x, x), dim=-1).mean(-1),
    ),
    Case(
        "pad: F.pad constant",
        lambda x, hook: F.pad(x[..., 1:], (0, 1)) + F.pad(x[:, 1:], (0, 0, 1, 0), value=2.0),
        low=2,
    ),
    Case(
        "pad: F.pad mode constant",
        lambda x, hook: F.pad(x[..., 1:], (1, 0), mode="constant", value=-1.0),
        low=2,
    ),
    Case(
        "tril/triu",
        lambda x, hook: x.tril() + torch.triu(x, diagonal=1) + x.tril(-1) + torch.tril(x, 1),
    ),
    Case("clone: method and function", lambda x, hook: torch.clone(x.clone()) * 3),
    Case("detach", lambda x, hook: x.detach() + torch.detach(x)),
    Case(
        "to: dtype, device, tensor, type_as",
        build=_over(
            lambda x, c: (
                x.to(torch.float64).to(x.dtype)
                + x.to("cpu")
                + x.to(c).to(x.dtype)
                + x.type_as(c).type_as(x)
                + x.to(x.device, torch.float16).to(dtype=x.dtype)
            ),
            c=lambda x, g: torch.zeros(1, dtype=torch.float64),
        ),
        dtypes=FLOATS,
    ),
    Case(
        "float/double/half/bfloat16",
        lambda x, hook: x.double().float() + x.half().float() + x.bfloat16().float(),
        dtypes=FLOATS,
    ),
    Case(
        "long/int/bool", lambda x, hook: x.long() + x.int() + x.bool(), kinds=FINITE, dtypes=FLOATS
    ),
    # C: elementwise
    Case(
        "add: operator, reflected, method, function, alpha",
        build=_captured(
            lambda x, c: (
                x + 1 + (2.5 + x) + x.add(c, alpha=2) + torch.add(x, c) + torch.add(x, 3, alpha=0.5)
            )
        ),
        dtypes=FLOATS,
        json=True,
    ),
    Case(
        "sub: operator, method, function, alpha",
        build=_captured(
            lambda x, c: (x - 1) + x.sub(c, alpha=0.5) + torch.subtract(x, c) + x.subtract(2)
        ),
        dtypes=FLOATS,
    ),
    Case("rsub: reflected", lambda x, hook: 1 - x + (2.5 - x) * 2, dtypes=FLOATS),
    Case(
        "mul: operator, reflected, method, function",
        build=_captured(
            lambda x, c: x * 2 + 3 * x + x.mul(c) + torch.multiply(x, c) + x.multiply(0.5)
        ),
        dtypes=FLOATS,
    ),
    Case(
        "div: operator, method, rounding modes",
        build=_captured(
            lambda x, c: (
                x / 2
                + x.div(c)
                + torch.div(x, c, rounding_mode="floor")
                + x.divide(3, rounding_mode="trunc")
                + x.true_divide(c)
            )
        ),
        dtypes=FLOATS,
    ),
    Case("rdiv: reflected", lambda x, hook: 1 / x + 2.0 / (x + 0.5), dtypes=FLOATS),
    Case(
        "floor_divide",
        build=_captured(lambda x, c: x // 2 + x.floor_divide(c) + torch.floor_divide(x, 3)),
    ),
    Case(
        "remainder", build=_captured(lambda x, c: x % 2 + x.remainder(c) + torch.remainder(x, -3))
    ),
    Case(
        "pow: operator, method, function",
        build=_captured(lambda x, c: x**2 + x.pow(c) + torch.pow(x, 3) + torch.pow(x.abs(), 0.5)),
    ),
    Case("rpow: reflected", lambda x, hook: 2**x + 0.5**x),
    Case(
        "maximum/minimum, max/min with a tensor",
        build=_captured(
            lambda x, c: torch.maximum(x, c) + x.minimum(c) + torch.max(x, c) + x.min(c)
        ),
        dtypes=FLOATS,
    ),
    Case(
        "lerp: number and tensor weight",
        build=_captured(lambda x, c: torch.lerp(x, c, 0.3) + x.lerp(c, c.sigmoid())),
    ),
    Case(
        "clamp: clamp, clip, keyword, tensor bounds",
        build=_captured(
            lambda x, c: (
                x.clamp(-1, 1)
                + torch.clip(x, min=0)
                + x.clamp(max=c)
                + torch.clamp(x, c - 1, c + 1)
                + x.clip(None, 0.5)
            )
        ),
        dtypes=FLOATS,
    ),
    Case(
        "nan_to_num: defaults and values",
        lambda x, hook: x.nan_to_num() + torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0),
        kinds=("special",),
        dtypes=FLOATS,
    ),
    Case(
        "comparisons: operators",
        build=_captured(
            lambda x, c: (
                (x == c) + (x != 0) + (x < c) + (x <= 0) + (x > c).float() + (x >= 0.5).float()
            )
        ),
    ),
    Case(
        "comparisons: methods and functions",
        build=_captured(
            lambda x, c: (
                x.eq(c).float()
                + torch.ne(x, c)
                + x.lt(0)
                + torch.le(x, c)
                + x.gt(c)
                + torch.ge(x, 0)
            )
        ),
    ),
    Case(
        "logical and/or/xor/not",
        lambda x, hook: (
            (torch.logical_and(x > 0, x < 1) | torch.logical_or(x > 1, x < -1)).float()
            + (x > 0).logical_xor(x > 1).logical_not()
            + torch.logical_not(x > 0)
            + (x > 0).logical_and(x < 2).logical_or(x == 0)
        ),
    ),
    Case(
        "bitwise and/or/not on bool",
        lambda x, hook: (
            x * ((x > 0) & (x < 1))
            + ((x > 1) | (x < -1))
            + torch.bitwise_and(x > 0, ~(x > 2))
            + (x < 0).bitwise_or(x > 0)
        ),
    ),
    Case(
        "neg: operator, method, function, negative",
        lambda x, hook: -x + x.neg() + torch.neg(x) + x.negative(),
        dtypes=FLOATS,
    ),
    Case(
        "abs: builtin, method, function",
        lambda x, hook: abs(x) + x.abs() + torch.abs(x),
        dtypes=FLOATS,
    ),
    Case(
        "sqrt/rsqrt/exp/log/log1p",
        lambda x, hook: x.sqrt() + torch.rsqrt(x) + x.exp() + torch.log(x) + x.log1p(),
        dtypes=FLOATS,
    ),
    Case(
        "sqrt etc. on positive values",
        lambda x, hook: torch.sqrt(x) * x.rsqrt() + torch.exp(-x) + x.log() - torch.log1p(x),
        kinds=("positive",),
        dtypes=FLOATS,
    ),
    Case(
        "sign/reciprocal/square",
        lambda x, hook: (
            x.sign()
            + torch.sign(x)
            + x.reciprocal()
            + torch.reciprocal(x)
            + x.square()
            + torch.square(x)
        ),
        dtypes=FLOATS,
    ),
    Case(
        "round/floor/ceil",
        lambda x, hook: (
            x.round()
            + torch.round(x * 0.5)
            + x.floor()
            + torch.floor(x)
            + x.ceil()
            + torch.ceil(x)
            + (x / 2).round()
        ),
        dtypes=FLOATS,
    ),
    Case(
        "isnan/isinf/isfinite",
        lambda x, hook: (
            x.isnan()
            + torch.isinf(x) * 2
            + x.isfinite() * 4
            + torch.isnan(x)
            + torch.isfinite(x)
            + x.isinf()
        ),
        kinds=("special",),
        dtypes=FLOATS,
    ),
    Case(
        "relu: method, function, F",
        lambda x, hook: x.relu() + torch.relu(x) + F.relu(x),
        dtypes=FLOATS,
    ),
    Case(
        "silu/sigmoid/tanh/softplus",
        lambda x, hook: (
            F.silu(x)
            + x.sigmoid()
            + torch.sigmoid(x)
            + F.sigmoid(x)
            + torch.tanh(x)
            + x.tanh()
            + F.tanh(x)
            + F.softplus(x)
        ),
        dtypes=FLOATS,
    ),
    Case("sin/cos", lambda x, hook: x.sin() + torch.sin(x) + x.cos() + torch.cos(x), dtypes=FLOATS),
    # in place
    Case("add_: +=, returns None", _iadd, json=True),
    Case("add_/mul_/sub_/div_: augmented assignments, returns x", _iadd_rebinds, dtypes=FLOATS),
    Case(
        "add_/sub_/mul_/div_: methods",
        build=_captured(lambda x, c: x.add_(c, alpha=2).sub_(1).mul_(c).div_(2)),
    ),
    Case("clamp_", build=_captured(lambda x, c: x.clamp_(min=-0.5).clamp_(max=c))),
    Case("zero_: a slice", _none(lambda x: x[:, 0].zero_())),
    Case("zero_: everything", lambda x, hook: x.zero_()),
    Case(
        "fill_: number and 0-d tensor",
        _none(lambda x: (x[:, -1].fill_(2.0), x[..., 0].fill_(torch.tensor(3.0)))),
    ),
    Case(
        "copy_: from a captured tensor",
        build=_captured(lambda x, c: _none(lambda x: x[:, 0].copy_(c[:, 0]))(x, None)),
    ),
    Case("copy_: from itself, returned", lambda x, hook: x.copy_(x.flip(0))),
    Case("neg_/relu_", lambda x, hook: x.neg_().relu_()),
    Case("relu_: F.relu(inplace=True)", _none(lambda x: F.relu(x, inplace=True))),
    Case("in place: detach()[:, 0] = 0", _detach_then_write),
    Case("in place: through views", _view_then_write),
    Case("in place: a diagonal view", _write_into_diagonal),
    Case("in place: an unbind view", _write_through_unbind),
    Case("in place: to(same dtype) aliases", _write_to_same_dtype),
    Case("in place then return another tensor", _write_then_return_other),
    Case("clone then write leaves x alone", _clone_then_write),
    # D: activations and norms
    Case(
        "gelu: exact and tanh",
        lambda x, hook: F.gelu(x) + F.gelu(x, approximate="tanh"),
        dtypes=FLOATS,
    ),
    Case(
        "softmax: method, function, F, dtype",
        lambda x, hook: (
            x.softmax(-1)
            + torch.softmax(x, dim=1)
            + F.softmax(x, dim=-1)
            + F.softmax(x, -1, dtype=torch.float64)
        ),
        dtypes=FLOATS,
    ),
    Case(
        "log_softmax: method, function, F",
        lambda x, hook: x.log_softmax(-1) + torch.log_softmax(x, 0) + F.log_softmax(x, dim=-1),
        dtypes=FLOATS,
    ),
    Case(
        "layer_norm: plain, weight and bias, eps",
        build=_over(
            lambda x, w, b: (
                F.layer_norm(x, x.shape[-1:]) + F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-3)
            ),
            w=VECTOR,
            b=VECTOR,
        ),
        dtypes=FLOATS,
    ),
    Case(
        "normalize: F, p and dim",
        lambda x, hook: F.normalize(x, dim=-1) + F.normalize(x, p=1.0, dim=0) + F.normalize(x),
    ),
    Case(
        "cosine_similarity: F and torch",
        build=_captured(
            lambda x, c: (
                F.cosine_similarity(x, c, dim=-1)[..., None] * x
                + torch.cosine_similarity(x, c)[:, None]
            )
        ),
    ),
    # E: reductions
    Case(
        "sum: all, dims, keepdim, dtype",
        lambda x, hook: (
            x
            - x.sum()
            + x.sum(-1, keepdim=True)
            + torch.sum(x, dim=(0, 1))
            + x.sum(dtype=torch.float64)
        ),
        dtypes=FLOATS,
    ),
    Case(
        "mean: all, dims, keepdim",
        lambda x, hook: (
            x
            - x.mean()
            + x.mean(-1, keepdim=True)
            + torch.mean(x, (0, 1))
            + x.mean(dim=[0], keepdim=True)
        ),
        dtypes=FLOATS,
    ),
    Case("prod", lambda x, hook: x * x.prod() + x.prod(-1, keepdim=True) + torch.prod(x, 0)),
    Case(
        "amax/amin",
        lambda x, hook: (
            x
            - x.amax(-1, keepdim=True)
            + torch.amin(x, (0, 1))
            + x.amax()
            + torch.amin(x, dim=0, keepdim=True)
        ),
    ),
    Case(
        "max/min: all elements",
        lambda x, hook: x - x.max() + torch.min(x) + x.min() - torch.max(x),
        dtypes=FLOATS,
    ),
    Case(
        "max/min with dim: values, indices, keepdim",
        lambda x, hook: (
            x
            - x.max(-1).values[..., None]
            + torch.min(x, dim=0)[1]
            + x.max(dim=-1, keepdim=True)[0]
            + torch.max(x, 1, True).indices
        ),
    ),
    Case(
        "min with dim: named fields",
        lambda x, hook: x + x.min(-1).indices[..., None] * torch.min(x, -1, keepdim=True).values,
    ),
    Case(
        "argmax/argmin: all, dim, keepdim",
        lambda x, hook: (
            x
            + x.argmax()
            + torch.argmin(x, -1, keepdim=True)
            + x.argmax(dim=0)
            + torch.argmax(x, 1, keepdim=True)
            + x.argmin()
        ),
    ),
    Case(
        "std/var: dims, correction",
        lambda x, hook: (
            x
            + x.std(-1, keepdim=True)
            + torch.var(x, dim=0, correction=0)
            + x.var()
            + torch.std(x, (0, 1))
        ),
    ),
    Case(
        "norm: method, torch.norm, vector_norm",
        lambda x, hook: (
            x
            + x.norm(dim=-1, keepdim=True)
            + torch.norm(x)
            + torch.linalg.vector_norm(x, ord=1, dim=-1)[..., None]
            + x.norm(p=1)
            + x.norm(2, -1, True)
        ),
    ),
    Case(
        "logsumexp",
        lambda x, hook: x - x.logsumexp(-1, keepdim=True) + torch.logsumexp(x, dim=(0, 1)),
    ),
    Case(
        "cumsum: method, function, dtype",
        lambda x, hook: x.cumsum(-1) + torch.cumsum(x, dim=0) + x.cumsum(1, dtype=torch.float64),
    ),
    Case(
        "all/any",
        lambda x, hook: (
            x * (x > 0).all()
            + (x > 0).any(-1, keepdim=True)
            + torch.all(x > -1, dim=0)
            + torch.any(x > 2)
        ),
    ),
    Case(
        "count_nonzero",
        lambda x, hook: (
            x
            + x.count_nonzero()
            + torch.count_nonzero(x, dim=-1)[..., None]
            + x.count_nonzero((0, 1))
        ),
    ),
    Case(
        "topk: values, indices, smallest",
        lambda x, hook: (
            x
            - x.topk(1, dim=-1).values
            + torch.topk(x, 1, -1, largest=False)[0]
            + x.topk(1).indices
        ),
    ),
    Case(
        "topk: k from the shape",
        lambda x, hook: x.topk(x.shape[-1], sorted=True).values.flip(-1),
    ),
    Case(
        "sort: method, function, descending",
        lambda x, hook: (
            x.sort(-1).values + torch.sort(x, dim=0, descending=True)[0] + x.sort().indices
        ),
    ),
    Case("argsort", lambda x, hook: x + x.argsort(-1) + torch.argsort(x, dim=0, descending=True)),
    # F: linear algebra
    Case(
        "matmul: @, method, function, reflected",
        build=_over(
            lambda x, w: x @ w + x.matmul(w) + torch.matmul(x, w) + (w @ x.mT).mT, w=SQUARE
        ),
        dtypes=(torch.float32, torch.float64),
    ),
    Case("matmul: vector", build=_over(lambda x, v: x + (x @ v)[..., None], v=VECTOR)),
    Case("mm", build=_over(lambda x, w: x.mm(w) + torch.mm(x, w), w=SQUARE), rank=(2, 2)),
    Case(
        "bmm",
        lambda x, hook: x.bmm(x.mT.bmm(x)) + torch.bmm(x, x.transpose(1, 2)).sum(-1, keepdim=True),
    ),
    Case(
        "outer/ger",
        build=_over(
            lambda x, v: (x.outer(v) + torch.outer(x, v) + torch.ger(x, v)).sum(-1), v=VECTOR
        ),
        rank=(1, 1),
    ),
    Case("dot", build=_over(lambda x, v: x * x.dot(v) + torch.dot(v, x), v=VECTOR), rank=(1, 1)),
    Case(
        "linear: F.linear and an nn.Module",
        build=_with_module,
        dtypes=(torch.float32, torch.float64),
    ),
    Case("linear: F.linear without bias", build=_over(lambda x, w: F.linear(x, w), w=SQUARE)),
    Case(
        "einsum: operands and list",
        build=_over(
            lambda x, w: (
                torch.einsum("bpd,de->bpe", x, w)
                + torch.einsum("bpd,bqd->bpq", [x, x]).sum(-1, keepdim=True)
                + torch.einsum("...d,d->...", x, w[0])[..., None]
            ),
            w=SQUARE,
        ),
    ),
    Case(
        "einsum: einops.einsum",
        build=_over(lambda x, w: einops.einsum(x, w, "b p d, d e -> b p e"), w=SQUARE),
    ),
    Case(
        "projection out of a unit direction",
        build=lambda x, g: partial(_project_out, unit=F.normalize(const(x, g, x.shape[-1]), dim=0)),
        json=True,
    ),
    # G: creation
    # Small factories fold into constants on the client; past FOLD_ELEMENTS they are nodes.
    Case(
        "zeros/ones folded: shapes, varargs, dtype",
        lambda x, hook: (
            x
            + torch.zeros(x.shape)
            + torch.ones(*x.shape, dtype=x.dtype)
            + torch.zeros(x.shape[-1], dtype=torch.float64)
            + torch.ones((1, 1))
        ),
        dtypes=FLOATS,
    ),
    Case(
        "zeros/ones as nodes: shapes, varargs, dtype",
        lambda x, hook: (
            x
            + torch.zeros(BIG)[: x.shape[-1]]
            + torch.ones(2, BIG, dtype=x.dtype)[1, -x.shape[-1] :]
            + torch.zeros((BIG, 1), dtype=torch.float64)[: x.shape[-1], 0]
        ),
        dtypes=FLOATS,
    ),
    Case(
        "full: folded and as a node",
        lambda x, hook: (
            x * torch.full(x.shape, 2.0)
            + torch.full((x.shape[-1],), -1, dtype=x.dtype)
            + torch.full((BIG,), 0.5)[: x.shape[-1]]
            + torch.full([2, BIG], 3, dtype=torch.int64)[0, : x.shape[-1]]
        ),
        dtypes=FLOATS,
    ),
    Case(
        "arange: end, start/end/step, dtype; folded and as a node",
        lambda x, hook: (
            x * torch.arange(x.shape[-1])
            + torch.arange(0, x.shape[-1] * 2, 2)
            + torch.arange(1.0, x.shape[-1] + 0.5, dtype=torch.float64)
            + torch.arange(BIG)[: x.shape[-1]]
            + torch.arange(-3, 3 * BIG, 3)[-x.shape[-1] :]
            + torch.arange(0.5, BIG + 0.5, dtype=torch.float64)[: x.shape[-1]]
        ),
    ),
    Case(
        "zeros_like/ones_like/full_like",
        lambda x, hook: (
            torch.zeros_like(x)
            + torch.ones_like(x, dtype=torch.float64)
            + torch.full_like(x, 3.0)
            + x
        ),
        dtypes=FLOATS,
    ),
    # what users write around the ops
    Case(
        "hook.layer() picks a captured scale",
        build=lambda x, g: partial(_layer_from_hook, scales=const(x, g, 4, 1)),
    ),
    Case("einops.reduce and repeat", _einops_mean),
    Case("a Python loop over positions, unrolled", _loop_over_positions),
]


def _case_id(case: Case) -> str:
    return case.name


@st.composite
def inputs(draw: st.DrawFn, case: Case) -> tuple[torch.Tensor, int]:
    rank = draw(st.integers(*case.rank))
    shape = tuple(draw(st.integers(case.low, 5)) for _ in range(rank))
    dtype = draw(st.sampled_from(case.dtypes))
    kind = draw(st.sampled_from(case.kinds))
    seed = draw(st.integers(0, 2**16))
    return values(shape, dtype, kind, seed), seed


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op_matches_eager(case: Case) -> None:
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(drawn=inputs(case))
    def run(drawn: tuple[torch.Tensor, int]) -> None:
        x, seed = drawn
        note(f"x: shape {list(x.shape)}, {x.dtype}, seed {seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # x.T on other ranks, etc.
            check(case.hook(x, seed), x)
            if case.json:
                check(case.hook(x, seed), x, encoding="json")

    run()


def _traced_ops(case: Case) -> set[str]:
    x = values((2, 3, 4, 5)[: case.rank[0]], case.dtypes[0], case.kinds[0], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = trace(case.hook(x, 0), HOOK, tuple(x.shape), x.dtype).graph
    return {node["op"] for node in graph["nodes"]}


def test_every_op_has_a_case() -> None:
    covered: set[str] = set()
    for case in CASES:
        try:
            covered |= _traced_ops(case)
        except Untraceable as exc:
            raise AssertionError(f"{case.name}: {exc.reason}: {exc.message}") from exc
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops of the opset no case uses: {missing}"
    assert covered <= set(OPS)


def test_ops_run_through_the_opset_table_only() -> None:
    """Every op name maps to exactly one entry, and each entry runs through its own wrapper."""
    assert len(OPS) == len({id(op) for op in OPS.values()})
    assert all(name == op.name and callable(op.run) for name, op in OPS.items())
    forbidden = {"empty", "empty_like", "as_strided", "set_", "resize_", "item", "tolist"}
    assert not forbidden & set(OPS)


# --- what must not trace, and why ----------------------------------------------------------------

COUNTS: dict[str, int] = {}
STORED: list[torch.Tensor] = []
FIRINGS = 0


def _value_branch(x: torch.Tensor, hook: Any) -> torch.Tensor:
    if x.sum() > 0:
        return x * 2
    return x


def _scalar_read(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x * x.max().item()


def _float_read(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x / float(x.norm())


def _tolist(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x + len(x.tolist())


def _prints(x: torch.Tensor, hook: Any) -> torch.Tensor:
    print("firing", hook.name, x.shape)
    return x


def _prints_values(x: torch.Tensor, hook: Any) -> torch.Tensor:
    print(x)
    return x


def _appends(x: torch.Tensor, hook: Any) -> None:
    STORED.append(x.detach())


def _dict_store_tensor(x: torch.Tensor, hook: Any, cache: dict[str, Any]) -> None:
    cache[hook.name] = x.detach()


def _dict_count(x: torch.Tensor, hook: Any) -> None:
    COUNTS[hook.name] = COUNTS.get(hook.name, 0) + 1


def _global_counter(x: torch.Tensor, hook: Any) -> torch.Tensor:
    global FIRINGS
    FIRINGS += 1
    return x


def _nonlocal_counter() -> HookFn:
    fired = 0

    def count(x: torch.Tensor, hook: Any) -> torch.Tensor:
        nonlocal fired
        fired += 1
        return x

    return count


def _ctx_store(x: torch.Tensor, hook: Any) -> None:
    hook.ctx["mean"] = x.mean()


class _Keeper:
    def __init__(self) -> None:
        self.last: Any = None

    def keep(self, x: torch.Tensor, hook: Any) -> None:
        self.last = x


def _escapes_into_attribute(x: torch.Tensor, hook: Any, box: Any) -> None:
    setattr(box, "last", x.detach())  # noqa: B010 (a call the prescreen cannot follow)


SCORES = torch.zeros(4)


def _write_into_captured(x: torch.Tensor, hook: Any) -> None:
    SCORES[hook.layer()] = x.mean()


STEER = torch.randn(6, requires_grad=True)


def _needs_grad(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x + STEER


UNTRACEABLE: list[tuple[str, HookFn, str, str]] = [
    # (what, function, reason, a word the message must contain)
    ("if on a value", _value_branch, "value-branch", "x.sum() > 0"),
    ("ternary on a value", lambda x, hook: x if (x > 0).all() else -x, "value-branch", "line"),
    (".item()", _scalar_read, "scalar-read", "item()"),
    ("float()", _float_read, "scalar-read", "float(x.norm())"),
    (".tolist()", _tolist, "scalar-read", "tolist"),
    ("print without values", _prints, "prints", "print"),
    ("print(tensor)", _prints_values, "prints-values", "print(x)"),
    ("f-string of a tensor", lambda x, hook: x + len(f"{x}"), "prints-values", "line"),
    ("list append", _appends, "python-state", "append"),
    ("dict store of a tensor", partial(_dict_store_tensor, cache={}), "python-state", "cache"),
    ("dict store of a count", _dict_count, "python-state", "COUNTS"),
    ("global counter", _global_counter, "python-state", "FIRINGS"),
    ("nonlocal counter", _nonlocal_counter(), "python-state", "fired"),
    ("hook.ctx store", _ctx_store, "python-state", "ctx"),
    ("attribute store on a bound self", _Keeper().keep, "python-state", "last"),
    ("escape through an attribute", partial(_escapes_into_attribute, box=_Keeper()),
     "python-state", "Python state"),
    ("write into a captured tensor", _write_into_captured, "python-state", "outside"),
    ("empty_like", lambda x, hook: torch.empty_like(x), "op-not-allowed", "torch.empty_like"),
    ("as_strided", lambda x, hook: x.as_strided((1,), (1,)), "op-not-allowed", "as_strided"),
    ("fft", lambda x, hook: torch.fft.fft(x).real, "op-not-allowed", "torch.fft.fft"),
    ("cummax", lambda x, hook: x.cummax(0).values, "op-not-allowed", "cummax"),
    ("nonzero", lambda x, hook: x.nonzero(), "op-not-allowed", "nonzero"),
    ("requires_grad_", lambda x, hook: x.requires_grad_(), "op-not-allowed", "requires_grad_"),
    ("set_", lambda x, hook: x.set_(x.view(-1)), "op-not-allowed", "set_"),
    ("out=", lambda x, hook: torch.mul(x, 2, out=x), "op-not-allowed", "out"),
    ("in-place silu", lambda x, hook: F.silu(x, inplace=True), "op-not-allowed", "silu"),
    ("softplus beta", lambda x, hook: F.softplus(x, beta=2.0), "op-not-allowed", "beta"),
    ("mask getitem", lambda x, hook: x + x[x > 0].sum(), "data-dependent-shape", "nonzero"),
    ("returns the shape", lambda x, hook: x.shape, "returns-non-tensor", "Size"),
    ("returns a tuple", lambda x, hook: (x, x), "returns-non-tensor", "tuple"),
    ("returns a float", lambda x, hook: 1.0, "returns-non-tensor", "float"),
    ("returns a reduction", lambda x, hook: x.sum(-1), "shape-mismatch", "[2, 3]"),
    ("returns a slice", lambda x, hook: x[:, :1], "shape-mismatch", "[2, 1, 6]"),
    ("captured requires_grad", _needs_grad, "grad-into-client-tensor", "requires grad"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "reason", "says"),
    [pytest.param(fn, reason, says, id=what) for what, fn, reason, says in UNTRACEABLE],
)
def test_untraceable_functions_say_why(fn: HookFn, reason: str, says: str) -> None:
    before = (dict(COUNTS), len(STORED), FIRINGS)
    with pytest.raises(Untraceable) as caught:
        trace(fn, HOOK, (2, 3, 6), torch.float32)
    assert caught.value.reason == reason, caught.value.message
    assert says in caught.value.message
    # Refused before it ran, or its Python effects were not kept: no counter is off by one.
    assert (COUNTS, len(STORED), FIRINGS) == before


def test_prescreen_does_not_refuse_tensor_methods_or_own_locals() -> None:
    """``torch.add`` / ``x.add`` are not ``set.add``; a local list or dict is the function's
    own; a comprehension's cell is not an outer variable."""

    def direct(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.add(x, 1) + x.add(2) + torch.Tensor.add(x, 3)

    def local_state(x: torch.Tensor, hook: Any) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        seen: dict[int, torch.Tensor] = {}
        for i in range(x.shape[0]):
            parts.append(x[i] * 2)
            seen[i] = parts[-1]
        return torch.stack([seen[i] for i in range(len(parts))])

    def cell(x: torch.Tensor, hook: Any) -> torch.Tensor:
        scale = 2.0
        scale = scale * 2
        return torch.stack([x[i] * scale for i in range(x.shape[0])])

    x = values((2, 3, 6), torch.float32, "normal", 3)
    for fn in (direct, local_state, cell):
        check(fn, x)


# --- constants: closures, partials, folding ------------------------------------------------------


def test_folding_uploads_only_what_the_graph_reads() -> None:
    g = torch.Generator().manual_seed(7)
    clean = torch.randn(16, 5, 8, generator=g)  # a whole "clean cache" entry
    vector = torch.randn(8, generator=g)
    x = values((2, 5, 8), torch.float32, "normal", 8)

    def patch(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x[:, 1, :] = clean[:2, 1, :]
        return x + (vector * 2 + 1)

    graph = check(patch, x)
    assert [list(c["tensor"].shape) for c in graph["consts"]] == [[2, 8], [8]]
    assert [node["op"] for node in graph["nodes"]] == ["setitem", "add"]
    _, const_bytes = compile_graph(CTX, over_the_wire(graph), WHERE, (2, 5, 8), torch.float32)
    assert const_bytes == (2 * 8 + 8) * 4

    def steer(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x + vector.expand(2, 5, 8)  # an expansion stays an op: it would grow the upload

    graph = check(steer, x)
    assert [list(c["tensor"].shape) for c in graph["consts"]] == [[8]]
    assert [node["op"] for node in graph["nodes"]] == ["expand", "add"]


def test_a_constant_used_twice_is_sent_once() -> None:
    vector = torch.randn(8, generator=torch.Generator().manual_seed(9))
    x = values((2, 5, 8), torch.float32, "normal", 10)
    graph = check(lambda x, hook: x * vector - vector + torch.where(x > 0, vector, x), x)
    assert len(graph["consts"]) == 1


def test_closures_and_partials_capture_values_at_trace_time() -> None:
    x = values((2, 5, 8), torch.float32, "normal", 11)
    direction = torch.randn(8, generator=torch.Generator().manual_seed(12))
    scale = 3.0

    def steer(x: torch.Tensor, hook: Any, alpha: float, position: int) -> torch.Tensor:
        x[:, position] += alpha * scale * direction
        return x

    graph = check(partial(steer, alpha=0.5, position=-2), x)
    assert len(graph["consts"]) == 1  # alpha * scale * direction, folded
    assert torch.equal(graph["consts"][0]["tensor"], 0.5 * scale * direction)
    # A returned constant (a cached activation) is sent once and copied by a node.
    cached = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(13))
    graph = check(lambda x, hook: cached, x)
    assert [node["op"] for node in graph["nodes"]] == ["clone"]


def test_numpy_ints_and_hook_layer_become_literals() -> None:
    np = pytest.importorskip("numpy")
    x = values((2, 5, 8), torch.float32, "normal", 14)
    position = np.int64(3)

    def patch(x: torch.Tensor, hook: Any) -> None:
        x[:, position, hook.layer()] = 0.0

    graph = check(patch, x)
    assert graph["nodes"][0]["args"]["index"] == [{"slice": [None, None, None]}, 3, 1]


# --- graphs that hold for every length of an axis ------------------------------------------------


def _generic(fn: HookFn, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, Any]:
    """What the client does for generation steps: trace at two lengths; if the graphs agree,
    the differing axes become null."""
    one, two = (trace(fn, HOOK, shape, dtype).graph for shape in shapes)
    assert one["nodes"] == two["nodes"] and one["output"] == two["output"]
    one["input"]["shape"] = [a if a == b else None for a, b in zip(*shapes, strict=True)]
    return one


GENERIC: list[tuple[str, HookFn]] = [
    ("add the last position", lambda x, hook: x + x[:, -1:]),
    ("zero the first position in place", _none(lambda x: x[:, 0].zero_())),
    ("softmax and a causal mask", lambda x, hook: x.softmax(-1).tril()),
    ("mean over positions", lambda x, hook: x - x.mean(1, keepdim=True)),
]  # fmt: skip


@pytest.mark.parametrize(("fn"), [pytest.param(fn, id=what) for what, fn in GENERIC])
def test_generic_graphs_run_at_other_lengths(fn: HookFn) -> None:
    graph = _generic(fn, [(2, 4, 6), (2, 5, 6)], torch.float32)
    assert graph["input"]["shape"] == [2, None, 6]
    for length in (1, 3, 9):
        x = values((2, length, 6), torch.float32, "normal", length)
        compiled = compiled_for(graph, (2, length, 6), torch.float32)
        assert compiled.matches((2, length, 6)) and not compiled.matches((3, length, 6))
        eager_x = x.clone()
        returned = fn(eager_x, hook=None)
        served_x = x.clone()
        out = compiled.run(served_x)
        assert_exact(served_x if out is None else out, eager_x if returned is None else returned,
                     f"length {length}")  # fmt: skip


def test_a_generic_graph_is_validated_for_the_length_it_meets() -> None:
    """``x[:, 3] = 0`` traced at lengths 5 and 6 holds for neither 2 nor 3 positions: the
    server refuses it for those, naming the node, before anything runs."""
    graph = _generic(_none(lambda x: x[:, 3].zero_()), [(2, 5, 6), (2, 6, 6)], torch.float32)
    compiled_for(graph, (2, 7, 6), torch.float32)
    for length in (2, 3):
        with pytest.raises(RequestError) as caught:
            compiled_for(graph, (2, length, 6), torch.float32)
        assert "nodes[0]" in caught.value.message


@given(
    batch=st.integers(1, 3),
    pos=st.integers(1, 6),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20, deadline=None, derandomize=True)
def test_patching_hooks_at_random_shapes(batch: int, pos: int, d: int, seed: int) -> None:
    """TransformerLens's patching setters (patching.py) as partials over a clean activation."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, pos, 2, d, generator=g)
    z = torch.randn(batch, pos, 2, d, generator=g)
    position, head = seed % pos, seed % 2

    def patch_pos(act: torch.Tensor, hook: Any, index: int) -> torch.Tensor:
        act[:, index, ...] = clean[:, index, ...]
        return act

    def patch_pos_head(act: torch.Tensor, hook: Any, index: tuple[int, int]) -> torch.Tensor:
        act[:, index[0], index[1]] = clean[:, index[0], index[1]]
        return act

    check(partial(patch_pos, index=position), z)
    check(partial(patch_pos_head, index=(position, head)), z)
