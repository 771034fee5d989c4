"""The JSON tensor form ``{"dtype", "shape", "data"}`` for curl users and small requests.

``data`` is a nested list following ``shape`` (what we send) or a flat C-order list (also
accepted); a scalar may be a bare number. Non-finite floats travel as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` because JSON has no literal for them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._dtypes import dtype_code, torch_dtype
from .errors import BadElementError, WireFormatError

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _map_nested(data: Any, fn: Any) -> Any:
    if isinstance(data, list):
        return [_map_nested(item, fn) for item in data]
    return fn(data)


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """The JSON form of ``tensor`` with a nested ``data`` list."""
    code = dtype_code(tensor.dtype)
    cpu = tensor.detach().cpu()
    if tensor.is_floating_point():
        data = cpu.double().tolist()
        if not bool(cpu.float().isfinite().all()):  # the walk is slow: only when needed
            data = _map_nested(data, _json_float)
    else:
        data = cpu.tolist()
    return {"dtype": code, "shape": list(tensor.shape), "data": data}


def _flatten(data: Any, shape: list[int]) -> list[Any]:
    """Elements of ``data`` in C order, checking that nesting (if any) follows ``shape``."""
    count = math.prod(shape)
    if not isinstance(data, list):
        if shape:
            raise WireFormatError(f"'data' must be a list for shape {shape}")
        return [data]
    if all(not isinstance(item, list) for item in data) and len(data) == count:
        return data
    flat: list[Any] = []

    def walk(node: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise WireFormatError(f"'data' is nested deeper than shape {shape}")
            flat.append(node)
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise WireFormatError(
                f"'data' does not match shape {shape}: expected a flat list of {count} elements "
                f"or lists nested as the shape (dimension {depth} has size {shape[depth]})"
            )
        for item in node:
            walk(item, depth + 1)

    walk(data, 0)
    return flat


def _element(value: Any, dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_floating_point:
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadElementError(f"element {value!r} is not a valid {dtype_code(dtype)} value")


def tensor_from_json(obj: Any) -> torch.Tensor:
    """Build a tensor from its JSON form; raises WireFormatError for anything malformed."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= obj.keys():
        raise WireFormatError("a JSON tensor is an object with 'dtype', 'shape' and 'data'")
    dtype = torch_dtype(obj["dtype"])
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
    ):
        raise WireFormatError(f"'shape' must be a list of non-negative integers, not {shape!r}")
    flat = _flatten(obj["data"], shape)
    if len(flat) != math.prod(shape):
        raise WireFormatError(
            f"'data' has {len(flat)} elements; shape {shape} needs {math.prod(shape)}"
        )
    values = [_element(value, dtype) for value in flat]
    # Build floats in float64 and cast: torch cannot construct every float type from a list.
    build_dtype = torch.float64 if dtype.is_floating_point else dtype
    try:
        tensor = torch.tensor(values, dtype=build_dtype)
    except (RuntimeError, OverflowError, ValueError) as exc:
        raise BadElementError(f"'data' does not fit {obj['dtype']}: {exc}") from None
    return tensor.to(dtype).reshape(shape)
