"""Golden vectors: the files decode to the values vectors.json describes, and the codec still
produces them byte for byte (so a format change cannot slip by without regenerating them)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from hooklab_proto import (
    ControlFrame,
    TensorFrame,
    decode_frame,
    encode_control,
    encode_tensor,
    read_stream,
    stream_chunks,
)

VECTORS = Path(__file__).parents[2] / "proto" / "vectors"
SPEC = json.loads((VECTORS / "vectors.json").read_text())
ENTRIES = {entry["file"]: entry for entry in SPEC["tensors"]}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


def same_values(actual: Any, expected: Any) -> bool:
    """Compare decoded ``tolist()`` output with the JSON description, NaN included."""
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same_values, actual, expected))
    if expected == "NaN":
        return math.isnan(actual)
    if expected in ("Infinity", "-Infinity"):
        return actual == (math.inf if expected == "Infinity" else -math.inf)
    return actual == expected and type(actual) is type(expected)


def described_tensor(entry: dict[str, Any]) -> torch.Tensor:
    """Build the described tensor without the codec: float64 first, then cast."""
    dtype = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8,
             "BOOL": torch.bool}[entry["dtype"]]  # fmt: skip

    def number(value: Any) -> Any:
        if isinstance(value, list):
            return [number(item) for item in value]
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, value)

    return torch.tensor(number(entry["values"]), dtype=dtype).reshape(entry["shape"])


@pytest.mark.parametrize("file", ENTRIES)
def test_vector_decodes_to_its_description(file: str) -> None:
    entry = ENTRIES[file]
    raw = (VECTORS / file).read_bytes()
    frame = decode_frame(bytearray(raw))
    assert isinstance(frame, TensorFrame)
    assert frame.name == entry["name"]
    assert list(frame.tensor.shape) == entry["shape"]
    expected_dtype = str(described_tensor(entry).dtype)
    assert str(frame.tensor.dtype) == expected_dtype
    values = frame.tensor.tolist()
    if frame.tensor.is_floating_point():
        values = frame.tensor.double().tolist()
    assert same_values(values, entry["values"])
    payload = math.prod(entry["shape"]) * ITEMSIZE[entry["dtype"]]
    assert len(raw) - payload == entry["data_offset"]
    assert entry["data_offset"] % 64 == 0
    assert raw[entry["data_offset"] - 5] == 0xC6
    assert struct.unpack(">I", raw[entry["data_offset"] - 4 : entry["data_offset"]])[0] == payload


@pytest.mark.parametrize("file", ENTRIES)
def test_codec_reproduces_the_vector(file: str) -> None:
    entry = ENTRIES[file]
    encoded = encode_tensor(described_tensor(entry), entry["name"]).to_bytes()
    assert encoded == (VECTORS / file).read_bytes(), "regenerate with proto/vectors/regenerate.py"


def test_stream_vector() -> None:
    raw = (VECTORS / SPEC["stream"]["file"]).read_bytes()
    frames = list(read_stream([raw]))
    described = SPEC["stream"]["frames"]
    assert len(frames) == len(described)
    for frame, expected in zip(frames, described, strict=True):
        if expected["kind"] == "tensor":
            entry = ENTRIES[expected["file"]]
            assert isinstance(frame, TensorFrame) and frame.name == entry["name"]
            assert torch.equal(frame.tensor, described_tensor(entry))
        else:
            fields = {k: v for k, v in expected.items() if k != "kind"}
            assert frame == ControlFrame(expected["kind"], fields)
    rebuilt = [
        encode_tensor(described_tensor(ENTRIES[f["file"]]), ENTRIES[f["file"]]["name"])
        if f["kind"] == "tensor"
        else encode_control(**f)
        for f in described
    ]
    assert b"".join(bytes(chunk) for chunk in stream_chunks(rebuilt)) == raw
