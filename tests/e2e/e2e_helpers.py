"""Helpers of the end-to-end tests: comparisons and the reference (TransformerLens) hook functions.

Every reference here is a plain Python hook function of the kind a TransformerLens user writes,
run by TransformerLens 3.9 itself; hooklab's result is never compared with hooklab's.

A *selection* is the cartesian product of the chosen indices along each axis (all indices of an
axis without a selector), as ``numpy.ix_`` builds it. Axes are named by letters: ``b`` batch,
``p`` position (the query position of attention patterns), ``h`` head, ``k`` key position, ``d``
any feature axis (d_model, d_head, d_mlp) — ``neuron`` selects the last axis.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np
import torch

ATOL = 1e-4

HookFn = Callable[[torch.Tensor, Any], torch.Tensor]
Selectors = dict[str, int | list[int]]

_SELECTOR_LETTER = {"batch": "b", "pos": "p", "head": "h"}


def assert_close(actual: Any, expected: Any, what: str = "value", atol: float = ATOL) -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.detach().double(), expected.detach().double()
    # masked attention scores are -inf in TL: the same entries must be the same infinity
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite), f"{what}: infinite entries differ"
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    assert not actual.isnan().any(), f"{what}: NaN in hooklab's value"
    finite = ~infinite
    diff = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def selection_index(shape: tuple[int, ...], axes: str, sel: Selectors) -> tuple[torch.Tensor, ...]:
    """Open-mesh index of the selection ``sel`` (selector name -> indices) on ``axes``."""
    assert len(axes) == len(shape), (axes, shape)
    chosen: dict[int, list[int]] = {}
    for name, value in sel.items():
        position = len(axes) - 1 if name == "neuron" else axes.index(_SELECTOR_LETTER[name])
        values = [value] if isinstance(value, int) else list(value)
        chosen[position] = [v % shape[position] for v in values]
    mesh = []
    for position, size in enumerate(shape):
        ids = torch.tensor(chosen.get(position, list(range(size))))
        view = [1] * len(shape)
        view[position] = -1
        mesh.append(ids.view(view))
    return tuple(mesh)


def selection_shape(shape: tuple[int, ...], axes: str, sel: Selectors) -> tuple[int, ...]:
    return tuple(ix.numel() for ix in selection_index(shape, axes, sel))


def edit(full: Callable[[torch.Tensor], torch.Tensor], axes: str, sel: Selectors) -> HookFn:
    """A TL hook that computes ``full(x)`` and writes it into the selection of ``x`` only."""

    def hook_fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        new = full(x)
        if not sel:
            return new.expand_as(x).clone()
        out = x.clone()
        index = selection_index(tuple(x.shape), axes, sel)
        out[index] = new.expand_as(x)[index]
        return out

    return hook_fn


def write_selection(
    value: Callable[[torch.Tensor], torch.Tensor], axes: str, sel: Selectors
) -> HookFn:
    """A TL hook that writes ``value(x)`` (shaped like, or broadcastable to, the selection)."""

    def hook_fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
        out = x.clone()
        index = selection_index(tuple(x.shape), axes, sel)
        shape = selection_shape(tuple(x.shape), axes, sel)
        out[index] = value(x).expand(shape)
        return out

    return hook_fn


def axes_of(name: str) -> str:
    """Axis letters of a TransformerLens hook point (documented shapes, TL 3.9)."""
    last = name.rsplit(".", 1)[-1]
    if last in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k"):
        return "bphd"
    if last in ("hook_pattern", "hook_attn_scores"):
        return "bhpk"
    if last in ("hook_result",):
        return "bphd"
    return "bpd"


# ---- an independent reader and writer of the wire formats (DESIGN.md §4) -----------------

FRAMES = "application/vnd.hooklab.frames+msgpack"

# safetensors dtype codes -> numpy (the subset the tests see)
_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def parse_frames(body: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(begin frame, tensors by name, end frame) of a frame stream, checking the layout rules:
    u32-LE length prefixes, begin first and end last, tensor maps with ``data`` last as bin32,
    aligned to 64 bytes within the frame, C-order little-endian payloads."""
    offset, frames = 0, []
    while offset < len(body):
        assert offset + 4 <= len(body), "truncated length prefix"
        (length,) = struct.unpack_from("<I", body, offset)
        frame = body[offset + 4 : offset + 4 + length]
        assert len(frame) == length, "truncated frame"
        frames.append(frame)
        offset += 4 + length
    decoded = [msgpack.unpackb(frame, raw=False, strict_map_key=True) for frame in frames]
    assert decoded and decoded[0]["kind"] == "begin", "the first frame is not 'begin'"
    assert decoded[-1]["kind"] == "end", f"the last frame is {decoded[-1]['kind']!r}, not 'end'"
    tensors: dict[str, torch.Tensor] = {}
    for frame, fields in zip(frames[1:-1], decoded[1:-1], strict=True):
        assert fields["kind"] == "tensor"
        assert list(fields) == ["kind", "v", "name", "dtype", "shape", "pad", "data"], list(fields)
        assert fields["v"] == 1
        data = fields["data"]
        start = len(frame) - len(data)
        assert frame[start - 5] == 0xC6, "data is not msgpack bin32"
        assert start % 64 == 0, f"data starts at byte {start} of its frame, not 64-aligned"
        array = np.frombuffer(
            frame, dtype=np.dtype(_NUMPY[fields["dtype"]]).newbyteorder("<"), offset=start
        ).reshape(fields["shape"])
        tensors[fields["name"]] = torch.from_numpy(array.astype(array.dtype.newbyteorder("=")))
    assert decoded[0].get("n_frames", len(tensors)) == len(tensors)
    return decoded[0], tensors, decoded[-1]


def json_tensor_value(obj: dict[str, Any]) -> torch.Tensor:
    """A tensor from its JSON form (nested data), written from the spec."""
    assert set(obj) == {"dtype", "shape", "data"}, set(obj)

    def finite(value: Any) -> Any:
        if isinstance(value, list):
            return [finite(v) for v in value]
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}.get(value, value)

    array = np.array(finite(obj["data"]), dtype=_NUMPY[obj["dtype"]])
    assert list(array.shape) == obj["shape"], (array.shape, obj["shape"])
    return torch.from_numpy(array)


def json_tensor(tensor: torch.Tensor, flat: bool = False) -> dict[str, Any]:
    data = tensor.reshape(-1).tolist() if flat else tensor.tolist()
    return {"dtype": "F32", "shape": list(tensor.shape), "data": data}


def msgpack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    code = {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype]
    array = np.ascontiguousarray(tensor.numpy()).astype(_NUMPY[code]().dtype.newbyteorder("<"))
    return {
        "kind": "tensor",
        "v": 1,
        "name": "",
        "dtype": code,
        "shape": list(array.shape),
        "pad": b"",
        "data": array.tobytes(),
    }


def post(
    client: httpx.Client, path: str, body: dict[str, Any], *, accept: str, encoding: str = "json"
) -> httpx.Response:
    if encoding == "json":
        response = client.post(path, json=body, headers={"accept": accept})
    else:
        response = client.post(
            path,
            content=msgpack.packb(body, use_bin_type=True),
            headers={"content-type": "application/msgpack", "accept": accept},
        )
    assert response.status_code == 200, response.text
    return response


def tensors_of(response: httpx.Response) -> dict[str, torch.Tensor]:
    content_type = response.headers["content-type"].split(";")[0]
    if content_type == "application/json":
        return {name: json_tensor_value(t) for name, t in response.json()["tensors"].items()}
    assert content_type == FRAMES, content_type
    return parse_frames(response.content)[1]
