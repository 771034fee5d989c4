"""The JSON tensor form, both directions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hooklab_proto import tensor_from_json, tensor_to_json


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([[0.5, -1.25], [3.0, 4.5]]),
        torch.tensor(2.5, dtype=torch.float16),
        torch.tensor([1.5, -2.0, 0.0078125], dtype=torch.bfloat16),
        torch.tensor([-1, 0, 2**40], dtype=torch.int64),
        torch.tensor([[True, False]]),
        torch.zeros(0, 3),
        torch.tensor([0, 255], dtype=torch.uint8),
    ],
    ids=["f32", "f16-scalar", "bf16", "i64", "bool", "empty", "u8"],
)
def test_json_round_trip_through_text(tensor: torch.Tensor) -> None:
    text = json.dumps(tensor_to_json(tensor), allow_nan=False)
    decoded = tensor_from_json(json.loads(text))
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_json_form_is_nested_like_the_shape() -> None:
    obj = tensor_to_json(torch.arange(6, dtype=torch.int32).reshape(2, 3))
    assert obj == {"dtype": "I32", "shape": [2, 3], "data": [[0, 1, 2], [3, 4, 5]]}


def test_flat_data_is_accepted() -> None:
    tensor = tensor_from_json({"dtype": "F32", "shape": [2, 2], "data": [1, 2, 3, 4]})
    assert tensor.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_non_finite_floats_travel_as_strings() -> None:
    obj = tensor_to_json(torch.tensor([math.nan, math.inf, -math.inf, 1.0]))
    assert obj["data"] == ["NaN", "Infinity", "-Infinity", 1.0]
    back = tensor_from_json(json.loads(json.dumps(obj, allow_nan=False)))
    assert math.isnan(back[0]) and back[1] == math.inf and back[2] == -math.inf
