"""Hostile traced-hook graphs against the real server: every one is refused with a 4xx naming
where it is wrong, and the server keeps serving.

A graph is the wire form of a traced Python hook function (proto ``Graph``, opset
``hooklab-ops/1``): a list of nodes naming ops by string, with arguments a client fully
controls. Each row of ``ROWS`` is one such graph (or a body around one), sent raw over HTTP as
a ``/v1/forward`` hook spec, once as JSON and once as msgpack, to a real ``hooklab-server``
subprocess (``tests/hostile/server_process.py``) serving the session's tiny GPT-2. For each:

* the answer is the row's 4xx status with a JSON error body whose message names the place
  (``hooks[0]…`` / ``hooks.0…``) — never a 5xx, never a hang (``Row.seconds``);
* afterwards ``/healthz`` answers and a normal forward still gives Hugging Face's log-probs on
  the same checkpoint (within 1e-4).

Rows that must be *accepted* (inf/nan literals, an expanded output) get 200. A seeded grammar
fuzz then sends a few hundred random node lists built from the opset table with random (mostly
well-formed) arguments: none may get a 5xx.

The activation at ``HOOK`` for ``REF_TOKENS`` is ``[1, 8, 64]`` float32.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from hooklab._transport import _encoder
from hooklab_proto import OPS, Kind, tensor_from_json, tensor_to_json
from hooklab_proto._opset import REQUIRED

from .server_process import ServerProcess, server_process

SETTINGS: dict[str, str] = {
    "device": "cpu",
    "max_request_bytes": "32MiB",  # room for 10^6 nodes: the node limit must refuse them
    "max_request_items": "4000000",
    "max_graph_const_bytes": "256KiB",
    "request_timeout_s": "20",
}
CONST_LIMIT = 256 * 1024
HOOK = "blocks.0.hook_resid_pre"
REF_TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11]]
ACT = [1, 8, 64]
JSON = "application/json"
MSGPACK = "application/msgpack"
ENCODINGS = ("json", "msgpack")
HEALTHZ_S = 1.0
LOGPROB_TOLERANCE = 1e-4
WHERE = re.compile(r"hooks(\[0\]|\.0)")

X: dict[str, Any] = {"in": 0}


def n(node: int, output: int | None = None) -> dict[str, int]:
    return {"n": node} if output is None else {"n": node, "o": output}


def c(number: int) -> dict[str, int]:
    return {"c": number}


def node(op: str, **args: Any) -> dict[str, Any]:
    return {"op": op, "args": args}


def graph(
    *nodes: dict[str, Any],
    output: Any = None,
    consts: list[Any] | None = None,
    shape: list[Any] | None = None,
    dtype: str = "F32",
    **extra: Any,
) -> dict[str, Any]:
    """A graph's wire form; constants may be torch tensors (encoded per body format)."""
    return {
        "graph_v": 1,
        "opset": "hooklab-ops/1",
        "input": {"shape": ACT if shape is None else shape, "dtype": dtype},
        "consts": [{"tensor": t} if isinstance(t, torch.Tensor) else t for t in consts or []],
        "nodes": list(nodes),
        "output": output,
        **extra,
    }


def spec(*graphs: dict[str, Any], hook: str = HOOK) -> dict[str, Any]:
    return {"hook": hook, "op": "graph", "graphs": list(graphs)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor_to_json(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def encode(body: dict[str, Any], encoding: str) -> bytes:
    if encoding == "msgpack":
        return _encoder.encode(body)
    return json.dumps(_jsonable(body), allow_nan=False).encode()


def forward_body(*specs: dict[str, Any]) -> dict[str, Any]:
    return {"input": REF_TOKENS, "hooks": list(specs)}


# --- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A hostile request: ``make()`` gives the hook spec (or, with ``raw``, the whole body)."""

    make: Callable[[], dict[str, Any]] | None = None
    status: tuple[int, ...] = (422,)
    says: str | None = None  # a regex the error's message or hint must match
    where: bool = True  # the message names the hook spec (hooks[0]…)
    body: Callable[[str], bytes] | None = None  # the whole body, per encoding
    encodings: tuple[str, ...] = ENCODINGS
    seconds: float = 10.0


def _ref(value: Any) -> Callable[[], dict[str, Any]]:
    """A graph returning the activation plus ``value`` (a value or reference, possibly
    malformed)."""
    return lambda: spec(graph(node("add", self=X, other=value), output=n(0)))


def _one(op: str, output: Any = None, **args: Any) -> Callable[[], dict[str, Any]]:
    return lambda: spec(graph(node(op, **args), output=output))


def _nodes(*nodes: dict[str, Any], **options: Any) -> Callable[[], dict[str, Any]]:
    return lambda: spec(graph(*nodes, **options))


def _ints(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _million_nodes() -> dict[str, Any]:
    return spec(graph(*([{}] * 10**6)))  # one value each: the count of values stays cheap


NESTED = "@nested@"


def _deep(depth: int) -> Callable[[str], bytes]:
    """A body whose one argument is a list nested ``depth`` deep (written out by hand: the
    encoders themselves refuse such depth)."""

    def body(encoding: str) -> bytes:
        made = forward_body(spec(graph(node("add", self=X, other=NESTED))))
        if encoding == "json":
            text = json.dumps(made).replace(f'"{NESTED}"', "[" * depth + "1" + "]" * depth)
            return text.encode()
        mark = _encoder.encode(NESTED)
        return _encoder.encode(made).replace(mark, b"\x91" * depth + b"\x01")

    return body


def _index_list(items: int) -> dict[str, Any]:
    return spec(graph(node("getitem", self=X, index=[0, {"ints": [0] * items}])))


def _long_index(items: int) -> dict[str, Any]:
    return spec(graph(node("getitem", self=X, index=[None] * items)))


def _big_const() -> dict[str, Any]:
    values = torch.zeros(CONST_LIMIT // 4 + 16)  # just over max_graph_const_bytes
    return spec(graph(node("add", self=X, other=1.0), consts=[values]))


def _many_consts() -> dict[str, Any]:
    return spec(graph(node("add", self=X, other=1.0), consts=[torch.zeros(1)] * 65))


def _const_dtype(code: str) -> dict[str, Any]:
    bad = {"dtype": code, "shape": [1], "data": [1]}
    return spec(graph(node("add", self=X, other=c(0)), consts=[{"tensor": bad}]))


def _sum_then(op: str, **args: Any) -> Callable[[], dict[str, Any]]:
    return lambda: spec(graph(node("long", self=X), node(op, self=n(0), **args)))


EVERY = (slice(None),)
ALL = {"slice": [None, None, None]}
GATHER_OOB = _ints([10**9] * 512).view(1, 8, 64)

ROWS: dict[str, Row] = {
    # names that are not ops
    **{
        f"op {name!r}": Row(_one(name, self=X), says="unknown op|op")
        for name in (
            "__import__", "eval", "exec", "torch.load", "os.system", "getattr", "__class__",
            "empty", "empty_like", "as_strided", "set_", "resize_", "item", "tolist", "nonzero",
            "data_ptr", "storage", "to_device", "cuda", "ADD", "add ", "OPS", "run",
        )
    },
    "op name empty": Row(_one("", self=X)),
    "op name too long": Row(_one("a" * 33, self=X)),
    "op name not a string": Row(lambda: spec(graph({"op": 5, "args": {}}))),
    # arguments that do not bind
    "out= argument": Row(_one("add", self=X, other=1, out=X), says="unknown arguments"),
    "dunder argument": Row(_one("add", self=X, other=1, __class__=X), says="unknown arguments"),
    "nine arguments": Row(_one("add", **{f"a{i}": 1 for i in range(9)}), says="at most 8"),
    "args not a map": Row(lambda: spec(graph({"op": "add", "args": [X, 1]}))),
    "node not a map": Row(lambda: spec(graph(["add", X]))),  # type: ignore[arg-type]
    "extra node key": Row(lambda: spec(graph({"op": "neg", "args": {"self": X}, "code": "1"}))),
    "missing required": Row(_one("add", self=X), says="required"),
    "tensor as number": Row(_one("clamp", self=X, min=[1.0])),
    "dim a float": Row(_one("sum", self=X, dim=1.5)),
    "dim a bool": Row(_one("sum", self=X, dim=True)),
    "dim out of range": Row(_one("softmax", self=X, dim=100)),
    "dims out of range": Row(_one("sum", self=X, dim=[0, 7])),
    "keepdim an int": Row(_one("sum", self=X, dim=0, keepdim=1)),
    "bad choice": Row(_one("div", self=X, other=2, rounding_mode="ceil")),
    "equation not a string": Row(_one("einsum", equation=5, operands=[X])),
    # references
    "forward ref": Row(_nodes(node("neg", self=n(1)), node("neg", self=X)), says="earlier"),
    "self ref": Row(_nodes(node("neg", self=X), node("neg", self=n(1))), says="earlier"),
    "negative ref": Row(_ref(n(-1))),
    "huge ref": Row(_ref(n(2**62))),
    "ref with extra key": Row(_ref({"n": 0, "x": 1})),
    "mixed ref": Row(_ref({"in": 0, "c": 0})),
    "input 1": Row(_ref({"in": 1})),
    "missing constant": Row(_ref(c(0)), says="constant 0"),
    "constant past the end": Row(lambda: spec(graph(node("add", self=X, other=c(3)),
                                                   consts=[torch.ones(1)]))),
    "unnamed output of topk": Row(_nodes(node("topk", self=X, k=1),
                                         node("neg", self=n(0))), says="outputs"),
    "output 7 of a single": Row(_nodes(node("neg", self=X), node("neg", self=n(0, 7)))),
    "output 0 of a single": Row(_nodes(node("neg", self=X), node("neg", self=n(0, 0))),
                                says="one output"),
    "output 0 of a 0-d": Row(_nodes(node("sum", self=X), node("lerp", self=X, end=X,
                                                               weight=n(0, 0)))),
    "output ref forward": Row(_nodes(node("neg", self=X), output=n(5))),
    "output ref a constant": Row(_nodes(node("neg", self=X), output=c(0))),
    "output ref multi": Row(_nodes(node("topk", self=X, k=64), output=n(0))),
    "output o past the end": Row(_nodes(node("topk", self=X, k=64), output=n(0, 2))),
    # sizes
    "10^6 nodes": Row(_million_nodes, (413,), says="max_graph_nodes", where=False, seconds=1.0),
    "nesting 10^4": Row(body=_deep(10**4), status=(400, 413, 422), where=False),
    "nesting 100": Row(body=_deep(100), status=(400, 422), where=False),
    "10^5-item index list": Row(lambda: _index_list(10**5)),
    "5000-item index list": Row(lambda: _index_list(5000)),
    "index of 10^4 items": Row(lambda: _long_index(10**4)),
    "65 constants": Row(_many_consts, (413,), says="max_graph_consts"),
    "constants over max_graph_const_bytes": Row(_big_const, (413,), says="max_graph_const_bytes"),
    "zeros 10^12": Row(_one("zeros", size=[10**12])),
    "zeros 2^40 in two axes": Row(_one("zeros", size=[2**20, 2**20]), (413,)),
    "zeros negative size": Row(_one("zeros", size=[-5])),
    "zeros -1": Row(_one("zeros", size=[-1])),
    "ones 46341^2": Row(_one("ones", size=[46341, 46341]), (413,)),
    "full 17 axes": Row(_one("full", size=[1] * 17, fill_value=1.0)),
    "arange 1e18": Row(_one("arange", start=0, end=1e18), (413,)),
    "arange to inf": Row(_one("arange", start=0, end={"float": "inf"})),
    "arange step 0": Row(_one("arange", start=0, end=10, step=0)),
    "arange step nan": Row(_one("arange", start=0, end=10, step={"float": "nan"})),
    "arange huge ints": Row(_one("arange", start=-(2**62), end=2**62, step=2**61)),
    "arange 1e308 by 1e-300": Row(_one("arange", start=-1e308, end=1e308, step=1e-300), (413,)),
    "expand to 2^40": Row(_one("expand", self=X, size=[2**20, 2**20, 8, 64]), (413,)),
    "expand negative": Row(_one("expand", self=X, size=[1, -2, 64])),
    "broadcast_to 2^60": Row(_one("broadcast_to", self=X, size=[2**30, 2**30, 8, 64]), (413,)),
    "repeat to 2^40": Row(_one("repeat", self=X, repeats=[2**20, 2**20, 1]), (413,)),
    "repeat negative": Row(_one("repeat", self=X, repeats=[-1, 1, 1])),
    "pad 2^31": Row(_one("pad", self=X, pad=[2**30, 2**30]), (413, 422)),
    "pad negative past the size": Row(_one("pad", self=X, pad=[-100, 0])),
    "view 2^31 x 0": Row(_one("view", self=X, size=[2**31 - 1, 0])),
    "topk k 2^31": Row(_one("topk", self=X, k=2**31 - 1)),
    "chunk 0": Row(_one("chunk", self=X, chunks=0)),
    "split 0": Row(_one("split", self=X, split_size=0)),
    "narrow past the end": Row(_one("narrow", self=X, dim=1, start=2**31 - 1, length=1)),
    "select past the end": Row(_one("select", self=X, dim=1, index=100)),
    "layer_norm shape 2^31": Row(_one("layer_norm", self=X, normalized_shape=[2**31 - 1])),
    "matmul over max_graph_flops": Row(
        _nodes(node("zeros", size=[4096, 4096]), node("matmul", self=n(0), other=n(0))),
        (413,), says="max_graph_flops",
    ),
    "einsum 4 operands to 7e10 elements": Row(
        _one("einsum", equation="ijk,lmn,opq,rst->ijklmnopqrst", operands=[X] * 4), (413,)
    ),
    # numbers
    "2^63": Row(_ref(2**63), says="64-bit"),
    "-2^63 - 1": Row(_ref(-(2**63) - 1), encodings=("json",)),
    "10^30": Row(_ref(10**30), (200, 422), encodings=("json",)),
    "untagged nan string": Row(_ref("nan")),
    "bad float tag": Row(_ref({"float": "1e999"})),
    "float tag with extra key": Row(_ref({"float": "nan", "x": 1})),
    "int literal into int32 overflow": Row(_nodes(node("int", self=X),
                                                 node("fill_", self=n(0), value=2**63 - 1))),
    "full int32 overflow": Row(_one("full", size=[2], fill_value=2**40, dtype={"dtype": "I32"})),
    # einsum
    "einsum 50 operands": Row(_one("einsum", equation="a" * 10, operands=[X] * 50)),
    "einsum 5 operands": Row(_one("einsum", equation="a,a,a,a,a->a", operands=[X] * 5),
                             says="at most 4"),
    "einsum bad equation": Row(_one("einsum", equation="ab,bc->ac", operands=[X, X])),
    "einsum words": Row(_one("einsum", equation="import os", operands=[X])),
    "einsum symbols": Row(_one("einsum", equation="__import__('os')", operands=[X])),
    "einsum 65 characters": Row(_one("einsum", equation="a" * 65, operands=[X])),
    "einsum arrows": Row(_one("einsum", equation="ijk->ijk->ijk", operands=[X])),
    # indices
    "gather constant out of range": Row(
        lambda: spec(graph(node("gather", self=X, dim=-1, index=c(0)), consts=[GATHER_OOB])),
        says="outside",
    ),
    "gather negative constant": Row(
        lambda: spec(graph(node("gather", self=X, dim=-1, index=c(0)),
                           consts=[_ints([-1] * 8).view(1, 8, 1)]))
    ),
    "gather float index": Row(
        lambda: spec(graph(node("gather", self=X, dim=-1, index=c(0)),
                           consts=[torch.zeros(1, 8, 1)]))
    ),
    "index_select out of range": Row(
        lambda: spec(graph(node("index_select", self=X, dim=1, index=c(0)),
                           consts=[_ints([0, 8])]))
    ),
    "index_select 2-d index": Row(
        lambda: spec(graph(node("index_select", self=X, dim=-1, index=c(0)),
                           consts=[_ints([0, 1, 2, 3]).view(2, 2)]))
    ),
    "take_along_dim flat out of range": Row(
        lambda: spec(graph(node("take_along_dim", self=X, indices=c(0)),
                           consts=[_ints([0, 511, 512])]))
    ),
    "getitem int out of range": Row(_one("getitem", self=X, index=[0, 8])),
    "getitem ints out of range": Row(_one("getitem", self=X, index=[0, {"ints": [0, -9]}])),
    "getitem constant out of range": Row(
        lambda: spec(graph(node("getitem", self=X, index=[ALL, c(0)]), consts=[_ints([8])]))
    ),
    "getitem uint8 constant": Row(
        lambda: spec(graph(node("getitem", self=X, index=[c(0)]),
                           consts=[_ints([3], torch.uint8)])), (200, 422)
    ),
    "getitem float constant": Row(
        lambda: spec(graph(node("getitem", self=X, index=[c(0)]), consts=[torch.zeros(1)]))
    ),
    "setitem int out of range": Row(_one("setitem", self=X, index=[0, 9], value=0.0)),
    "setitem constant out of range": Row(
        lambda: spec(graph(node("setitem", self=X, index=[0, c(0)], value=0.0),
                           consts=[_ints([0, -9])]))
    ),
    "setitem mask of the wrong shape": Row(_nodes(
        node("getitem", self=X, index=[0]), node("gt", self=n(0), other=0),
        node("setitem", self=X, index=[n(1)], value=1.0),
    )),
    "slice step 0": Row(_one("getitem", self=X, index=[{"slice": [0, 1, 0]}])),
    "slice step negative": Row(_one("getitem", self=X, index=[{"slice": [None, None, -1]}])),
    "slice of two": Row(_one("getitem", self=X, index=[{"slice": [0, 1]}])),
    "slice past 2^31": Row(_one("getitem", self=X, index=[{"slice": [0, 2**40, 1]}])),
    "ellipsis false": Row(_one("getitem", self=X, index=[{"ellipsis": False}])),
    "index a string": Row(_one("getitem", self=X, index="abc")),
    "computed integer index": Row(_nodes(
        node("argmax", self=X), node("add", self=n(0), other=10**9),
        node("getitem", self=X, index=[ALL, n(1)]),
    )),
    "computed gather index out of range": Row(_nodes(
        node("argmax", self=X, dim=-1, keepdim=True), node("add", self=n(0), other=10**9),
        node("gather", self=X, dim=-1, index=n(1)),
    ), says="out of range"),
    "computed gather index from values": Row(_nodes(
        node("mul", self=X, other=1000.0), node("long", self=n(0)),
        node("gather", self=X, dim=-1, index=n(1)),
    )),
    "computed index_select index": Row(_nodes(
        node("long", self=X), node("getitem", self=n(0), index=[0, 0]),
        node("add", self=n(1), other=10**6), node("index_select", self=X, dim=-1, index=n(2)),
    ), says="out of range"),
    # writes
    "in place on a constant": Row(
        lambda: spec(graph(node("add_", self=c(0), other=1.0), consts=[torch.zeros(64)])),
        says="constant",
    ),
    "in place on a constant's view": Row(
        lambda: spec(graph(node("detach", self=c(0)), node("getitem", self=n(0), index=[0]),
                           node("fill_", self=n(1), value=1.0), consts=[torch.zeros(2, 64)])),
        says="constant",
    ),
    "in place on an unbound constant": Row(
        lambda: spec(graph(node("unbind", self=c(0)), node("zero_", self=n(0, 1)),
                           consts=[torch.zeros(2, 64)])),
        says="constant",
    ),
    "setitem into a constant": Row(
        lambda: spec(graph(node("setitem", self=c(0), index=[0], value=X),
                           consts=[torch.zeros(2, 64)])),
        says="constant",
    ),
    "copy_ into a constant": Row(
        lambda: spec(graph(node("copy_", self=c(0), src=c(0)), consts=[torch.zeros(64)])),
        says="constant",
    ),
    "in place on an expanded view": Row(_nodes(
        node("getitem", self=X, index=[ALL, {"slice": [0, 1, None]}]),
        node("expand", self=n(0), size=ACT), node("add_", self=n(1), other=1.0),
    )),
    "copy_ into an expanded view of x": Row(_nodes(
        node("getitem", self=X, index=[0, 0, {"slice": [0, 1, None]}]),
        node("expand_as", self=n(0), other=X), node("copy_", self=n(1), src=X),
    )),
    "long add_ a float": Row(_nodes(node("long", self=X), node("add_", self=n(0), other=1.5))),
    # kernels that exist on meta but not for these dtypes, or fail on values
    "integer division by zero": Row(_sum_then("div", other=0, rounding_mode="floor")),
    "integer remainder by zero": Row(_sum_then("remainder", other=0)),
    "integer floor_divide by itself": Row(_sum_then("floor_divide", other=n(0))),
    "integer to a negative power": Row(_sum_then("pow", exponent=-1)),
    "softmax of integers": Row(_one("softmax", self=X, dim=1, dtype={"dtype": "I64"})),
    "bitwise_and of floats": Row(_one("bitwise_and", self=X, other=X)),
    "gelu of integers": Row(_sum_then("gelu")),
    "std of integers": Row(_sum_then("std")),
    "topk of bools": Row(_nodes(node("bool", self=X), node("topk", self=n(0), k=1))),
    "arange of bools": Row(_one("arange", start=0, end=2, dtype={"dtype": "BOOL"})),
    "float8 arithmetic": Row(_nodes(node("to", self=X, dtype={"dtype": "F8_E4M3"}),
                                    node("mul", self=n(0), other=2.0))),
    # the output contract
    "output a reduction": Row(_nodes(node("sum", self=X), output=n(0)), says="shape"),
    "output a slice": Row(_nodes(node("getitem", self=X, index=[0, 0]), output=n(0))),
    "output an expanded mean": Row(_nodes(
        node("mean", self=X, dim=1, keepdim=True), node("expand_as", self=n(0), other=X),
    output=n(1)), (200,)),
    "output a constant's view": Row(
        lambda: spec(graph(node("detach", self=c(0)), output=n(0), consts=[torch.zeros(ACT)])),
        (200,),
    ),
    # the input it was traced for
    "traced for another shape": Row(lambda: spec(graph(shape=[1, 9, 64])), says="shape"),
    "traced for another rank": Row(lambda: spec(graph(shape=[8, 64]))),
    "traced for 9 axes": Row(lambda: spec(graph(shape=[1] * 9))),
    "traced for a negative axis": Row(lambda: spec(graph(shape=[1, -8, 64]))),
    "traced for F16": Row(lambda: spec(graph(dtype="F16")), says="F16"),
    "traced for a bad dtype code": Row(lambda: spec(graph(dtype="X99"))),
    "opset from the future": Row(lambda: spec(graph(opset="hooklab-ops/9")), says="opset"),
    "graph_v 2": Row(lambda: spec(graph(graph_v=2))),
    "no graphs": Row(lambda: spec()),
    "five graphs": Row(lambda: spec(*[graph()] * 5)),
    "unknown hook point": Row(lambda: spec(graph(), hook="blocks.9.hook_nothing"), (404, 422),
                              says="blocks.9.hook_nothing", where=False),
    "extra graph key": Row(lambda: spec(graph(code="print(1)"))),
    # dtype codes
    "constant dtype code unknown": Row(lambda: _const_dtype("X99"), (400, 422)),
    "constant dtype code empty": Row(lambda: _const_dtype(""), (400, 422)),
    "dtype argument unknown": Row(_one("to", self=X, dtype={"dtype": "Q"})),
    "dtype argument not a map": Row(_one("to", self=X, dtype="F32")),
    "constant bytes disagree with its shape": Row(
        lambda: spec(graph(node("add", self=X, other=c(0)),
                           consts=[{"tensor": {"kind": "tensor", "dtype": "F32", "shape": [4],
                                               "data": b"\0" * 3}}])),
        (400, 422), encodings=("msgpack",),
    ),
    "constant from a cache that does not exist": Row(
        lambda: spec(graph(node("add", self=X, other=c(0)),
                           consts=[{"cache": "c_nothing", "key": HOOK}])),
        (404,), where=False,
    ),
    # accepted: non-finite literals stay in this request's rows
    "nan literal": Row(_ref({"float": "nan"}), (200,)),
    "inf literals": Row(_nodes(node("mul", self=X, other={"float": "inf"}),
                               node("clamp", self=n(0), min={"float": "-inf"}, max=1e30),
                               output=n(1)), (200,)),
}  # fmt: skip


# --- the server ----------------------------------------------------------------------------------


class Served(NamedTuple):
    server: ServerProcess
    logprobs: torch.Tensor  # Hugging Face's log_softmax on REF_TOKENS
    client: httpx.Client  # one keep-alive client for every request of the module


@pytest.fixture(scope="module")
def served(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor(REF_TOKENS)).logits.log_softmax(-1)
    del model
    log = tmp_path_factory.mktemp("hostile-graphs") / "server.log"
    with (
        server_process(gpt2_checkpoint, log, SETTINGS) as server,
        httpx.Client(base_url=server.url, timeout=30.0) as client,
    ):
        yield Served(server, logprobs, client)


def post(served: Served, body: bytes, encoding: str, timeout_s: float = 30.0) -> httpx.Response:
    media = MSGPACK if encoding == "msgpack" else JSON
    headers = {"content-type": media, "accept": JSON}
    return served.client.post("/v1/forward", content=body, headers=headers, timeout=timeout_s)


def logprob_gap(response: httpx.Response, logprobs: torch.Tensor) -> float:
    logits = tensor_from_json(response.json()["tensors"]["output.logits"])
    if logits.shape != logprobs.shape:
        return math.inf
    return float((logits.log_softmax(-1) - logprobs).abs().max())


def still_serving(served: Served) -> list[str]:
    """/healthz answers at once and a normal forward gives Hugging Face's log-probs."""
    server = served.server
    if not server.alive():
        return [f"the server died:\n{server.log_tail(30)}"]
    problems = []
    seconds, problem = server.healthz(served.client, timeout_s=5.0)
    if problem or seconds >= HEALTHZ_S:
        problems.append(f"/healthz took {seconds:.2f} s: {problem or 'ok'}")
    response = post(served, encode({"input": REF_TOKENS}, "json"), "json")
    if response.status_code != 200:
        problems.append(f"a normal forward got {response.status_code}: {response.text[:300]}")
    elif (gap := logprob_gap(response, served.logprobs)) >= LOGPROB_TOLERANCE:
        problems.append(f"a normal forward's log_softmax differs from HF by {gap:.3g}")
    return problems


def answer_problems(row: Row, response: httpx.Response, seconds: float) -> list[str]:
    problems = []
    if seconds > row.seconds:
        problems.append(f"answered in {seconds:.2f} s, over {row.seconds} s")
    if response.status_code not in row.status:
        expected = " or ".join(map(str, row.status))
        problems.append(
            f"status {response.status_code}, expected {expected}: {response.text[:400]}"
        )
    if response.status_code < 400:
        return problems
    try:
        error = response.json()["error"]
        said = f"{error['message']}\n{error.get('hint') or ''}"
    except (ValueError, KeyError, TypeError):
        return [*problems, f"not a JSON error body: {response.text[:300]!r}"]
    if row.where and not WHERE.search(said):
        problems.append(f"the error does not say where (hooks[0]…): {said[:300]!r}")
    if row.says and not re.search(row.says, said, re.IGNORECASE):
        problems.append(f"/{row.says}/ not in the error: {said[:300]!r}")
    return problems


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_graph(served: Served, name: str, encoding: str) -> None:
    row = ROWS[name]
    if encoding not in row.encodings:
        pytest.skip(f"{encoding} cannot carry this row")
    if row.body is not None:
        body = row.body(encoding)  # built before the clock
    else:
        assert row.make is not None
        body = encode(forward_body(row.make()), encoding)
    started = time.monotonic()
    response = post(served, body, encoding, timeout_s=row.seconds + 10.0)
    seconds = time.monotonic() - started
    problems = answer_problems(row, response, seconds) + still_serving(served)
    assert not problems, "\n".join([f"{name} ({encoding}):", *problems])


def test_accepted_non_finite_literals_stay_in_the_rows(served: Served) -> None:
    """``x * nan`` at the first hook point gives NaN logits for this request only."""
    make = ROWS["nan literal"].make
    assert make is not None
    body = encode(forward_body(make()), "msgpack")
    response = post(served, body, "msgpack", 30.0)
    assert response.status_code == 200, response.text[:300]
    logits = tensor_from_json(response.json()["tensors"]["output.logits"])
    assert logits.isnan().all()
    assert not still_serving(served)


def _stored_zeros(served: Served) -> str:
    body = encode({"tensor": torch.zeros(ACT)}, "msgpack")
    response = served.client.post("/v1/tensors", content=body, headers={"content-type": MSGPACK})
    assert response.status_code == 201, response.text[:300]
    return str(response.json()["id"])


def _stored(served: Served, object_id: str) -> torch.Tensor:
    response = served.client.get(f"/v1/tensors/{object_id}", headers={"accept": JSON})
    assert response.status_code == 200, response.text[:300]
    return tensor_from_json(response.json()["tensors"][object_id])


@pytest.mark.parametrize(
    "returns",
    [
        pytest.param([node("detach", self=c(0))], id="detach"),
        pytest.param([node("float", self=c(0))], id="float (a no-op cast)"),
        pytest.param([node("einsum", equation="bpd->bpd", operands=[c(0)])], id="einsum"),
        pytest.param([node("unbind", self=c(0)), node("stack", tensors=[n(0, 0)])], id="stack"),
    ],
)
def test_a_stored_tensor_is_never_edited_through_a_graph(
    served: Served, returns: list[dict[str, Any]]
) -> None:
    """One hook returns (a view of) a stored tensor, the next adds 5 to the activation in place,
    or edits it through a cast or einsum view: the stored tensor stays zeros."""
    object_id = _stored_zeros(served)
    const = {"tensor": {"ref": object_id}}
    first = spec(graph(*returns, output=n(len(returns) - 1), consts=[const]))
    second = spec(graph(node("add_", self=X, other=5.0)))
    body = encode(forward_body(first, second), "msgpack")
    response = post(served, body, "msgpack", 30.0)
    assert response.status_code == 200, response.text[:300]
    through = spec(graph(*returns[:1], node("add_", self=n(0), other=5.0), consts=[const]))
    response = post(served, encode(forward_body(through), "json"), "json", 30.0)
    if returns[0]["op"] != "unbind":
        assert response.status_code == 422 and "constant" in response.text, response.text[:300]
    assert torch.equal(_stored(served, object_id), torch.zeros(ACT))


# --- grammar fuzz --------------------------------------------------------------------------------

FUZZ_CASES = 400
INTS = [0, 1, 2, 3, -1, -2, 7, 8, 63, 64, 65, 2**31 - 1, -(2**31) + 1, 2**40, -(2**40), 2**62]
FLOATS = [0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, {"float": "inf"}, {"float": "-inf"}, {"float": "nan"}]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "X", ""]
EQUATIONS = ["bpd,de->bpe", "...d,d->...", "ij,jk->ik", "ii->i", "a,b->ab", "bpd->", "->", "z"]


class Fuzz:
    """Random graphs from the opset's parameter kinds: mostly well formed, sometimes not."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def ref(self, nodes: int, consts: int) -> Any:
        roll = self.rng.random()
        if roll < 0.45 or nodes == 0:
            return X
        if roll < 0.85:
            number = self.rng.randrange(nodes)
            return n(number, self.rng.choice([0, 1])) if self.chance(0.2) else n(number)
        if roll < 0.95 and consts:
            return c(self.rng.randrange(consts))
        return self.rng.choice([n(nodes + 3), c(99), {"in": 2}, {"x": 1}, "in", None, 3])

    def ints(self, small: bool) -> int:
        return self.rng.choice([-1, 0, 1, 2, -2, 3]) if small else self.rng.choice(INTS)

    def number(self) -> Any:
        return self.rng.choice(FLOATS) if self.chance(0.6) else self.ints(self.chance(0.8))

    def index_item(self, nodes: int, consts: int) -> Any:
        kind = self.rng.randrange(8)
        if kind == 0:
            return self.ints(self.chance(0.8))
        if kind in (1, 2):
            bounds = [self.rng.choice([None, 0, 1, -1, 3, 2**40]) for _ in range(2)]
            return {"slice": [*bounds, self.rng.choice([None, 1, 2, 0, -1])]}
        if kind == 3:
            return None
        if kind == 4:
            return {"ellipsis": True}
        if kind == 5:
            return {"ints": [self.ints(True) for _ in range(self.rng.randrange(4))]}
        return self.ref(nodes, consts)

    def argument(self, kind: Kind, nodes: int, consts: int) -> Any:
        if kind is Kind.TENSOR:
            return self.ref(nodes, consts)
        if kind is Kind.TENSOR_OR_NUMBER:
            return self.ref(nodes, consts) if self.chance(0.5) else self.number()
        if kind is Kind.TENSORS:
            return [self.ref(nodes, consts) for _ in range(self.rng.choice([1, 2, 3, 5, 17]))]
        if kind is Kind.NUMBER:
            return self.number()
        if kind in (Kind.INT, Kind.DIM):
            return self.ints(self.chance(0.85))
        if kind is Kind.BOOL:
            return self.rng.choice([True, False, 1, None])
        if kind is Kind.DIMS:
            if self.chance(0.5):
                return self.ints(True)
            return [self.ints(True) for _ in range(self.rng.randrange(4))]
        if kind is Kind.SIZE:
            sizes = [
                self.rng.choice([1, 8, 64, -1, 0, 2, 512]) for _ in range(self.rng.randrange(5))
            ]
            return sizes if self.chance(0.9) else [self.ints(False) for _ in sizes]
        if kind is Kind.INDEX:
            return [self.index_item(nodes, consts) for _ in range(self.rng.randrange(1, 5))]
        if kind is Kind.DTYPE:
            return {"dtype": self.rng.choice(DTYPES)}
        if kind is Kind.EQUATION:
            return self.rng.choice(EQUATIONS)
        return self.rng.choice(["none", "tanh", "trunc", "floor", "ceil", None])

    def graph(self) -> dict[str, Any]:
        consts: list[Any] = [torch.randn(ACT), torch.randn(64), torch.tensor([0, 3, 7]),
                             torch.tensor([True, False])][: self.rng.randrange(5)]  # fmt: skip
        nodes = []
        names = sorted(OPS)
        for number in range(self.rng.randrange(1, 7)):
            op = OPS[self.rng.choice(names)]
            args = {}
            for param in op.params:
                optional = param.default is not REQUIRED
                if optional and self.chance(0.6):
                    continue
                args[param.name] = self.argument(param.kind, number, len(consts))
            if self.chance(0.03):
                args["unknown"] = 1
            nodes.append(node(op.name, **args))
        output = None if self.chance(0.6) else self.ref(len(nodes), len(consts))
        return graph(*nodes, output=output, consts=consts)


def test_fuzzed_graphs_never_get_a_5xx(served: Served) -> None:
    fuzz = Fuzz(seed=20261206)
    statuses: dict[int, int] = {}
    failures = []
    for number in range(FUZZ_CASES):
        encoding = ENCODINGS[number % 2]
        made = fuzz.graph()
        response = post(served, encode(forward_body(spec(made)), encoding), encoding)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(
                f"case {number} ({encoding}): {response.status_code} {response.text[:300]}\n"
                f"  nodes: {json.dumps(_jsonable(made['nodes']))[:600]}"
            )
    assert not failures, "\n".join([f"{len(failures)} fuzzed graphs got a 5xx:", *failures[:10]])
    assert statuses.get(200, 0) >= FUZZ_CASES // 20, f"too few graphs ran: {statuses}"
    assert not still_serving(served)


def test_a_graph_failing_as_it_runs_fails_only_its_request(served: Served) -> None:
    """Integer division by zero passes validation (shapes and dtypes are fine) and fails as it
    runs: that request gets a 422 naming the node; normal forwards sent at the same moment
    (possibly merged into one batch with it) still get Hugging Face's log-probs."""
    make = ROWS["integer division by zero"].make
    assert make is not None
    offender = encode(forward_body(make()), "msgpack")
    normal = encode({"input": REF_TOKENS}, "msgpack")
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            futures = [pool.submit(post, served, offender, "msgpack")]
            futures += [pool.submit(post, served, normal, "msgpack") for _ in range(6)]
            first, *others = [future.result() for future in futures]
            assert first.status_code == 422 and WHERE.search(first.text), first.text[:300]
            for response in others:
                assert response.status_code == 200, response.text[:300]
                assert logprob_gap(response, served.logprobs) < LOGPROB_TOLERANCE
