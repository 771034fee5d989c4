"""Malformed bytes and JSON: each raises WireFormatError with a message that says what is wrong."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from hooklab_proto import (
    FrameReader,
    TruncatedStreamError,
    WireFormatError,
    decode_frame,
    encode_tensor,
    tensor_from_json,
)


def tensor_map(**overrides: object) -> bytes:
    """A tensor map written with msgpack-python, so malformed variants are easy to build."""
    fields: dict[str, object] = {
        "kind": "tensor",
        "v": 1,
        "name": "t",
        "dtype": "F32",
        "shape": [2],
        "pad": b"",
        "data": struct.pack("<2f", 1.0, 2.0),
    }
    fields.update(overrides)
    return msgpack.packb({k: v for k, v in fields.items() if v is not None}, use_bin_type=True)


BAD_FRAMES = {
    "unknown dtype": (tensor_map(dtype="F31"), "unknown dtype 'F31'"),
    "numpy dtype string": (tensor_map(dtype="<f4"), "unknown dtype"),
    "too few bytes": (tensor_map(shape=[3]), "needs 12 bytes, the frame carries 8"),
    "too many bytes": (tensor_map(shape=[1]), "needs 4 bytes, the frame carries 8"),
    "negative size": (tensor_map(shape=[-2]), "non-negative"),
    "shape not a list": (tensor_map(shape="2"), "malformed tensor frame"),
    "data not binary": (tensor_map(data="abcdefgh"), "malformed tensor frame"),
    "missing data": (tensor_map(data=None), "malformed tensor frame"),
    "future version": (tensor_map(v=2), "version 2 is not supported"),
    "bool byte 2": (tensor_map(dtype="BOOL", shape=[2], data=b"\x01\x02"), "0 or 1"),
    "unknown kind": (msgpack.packb({"kind": "tensor_part"}), "unknown frame kind"),
    "kind not a string": (msgpack.packb({"kind": 3}), "string 'kind'"),
    "not a map (int)": (msgpack.packb(7), "must be a msgpack map"),
    "not a map (array)": (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    "garbage": (b"\xc1\xff\x00garbage", "must be a msgpack map"),
    "trailing bytes": (tensor_map() + b"\x00", "trailing"),
    "truncated map": (tensor_map()[:-3], "must be a msgpack map"),
    "ext type in control frame": (
        msgpack.packb({"kind": "begin", "x": msgpack.ExtType(1, b"evil")}),
        "extension types are not allowed",
    ),
    "error frame without code": (msgpack.packb({"kind": "error", "message": "m"}), "'code'"),
}


@pytest.mark.parametrize("raw,expected", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_frame_raises_wire_format_error(raw: bytes, expected: str) -> None:
    with pytest.raises(WireFormatError, match=expected) as info:
        decode_frame(bytearray(raw))
    assert not isinstance(info.value, TruncatedStreamError)  # a bad frame, not a cut-off one


def test_declared_frame_length_over_the_limit_is_refused_before_any_payload() -> None:
    reader = FrameReader(max_frame_bytes=1024)
    with pytest.raises(WireFormatError, match="exceeds the limit of 1024 bytes"):
        reader.feed(struct.pack("<I", 1025))


def test_zero_length_frame_is_refused() -> None:
    with pytest.raises(WireFormatError, match="frame length 0"):
        FrameReader().feed(struct.pack("<I", 0))


def test_huge_declared_length_allocates_nothing_until_the_bytes_arrive() -> None:
    import tracemalloc

    reader = FrameReader()  # the default limit allows up to 4 GiB - 1
    tracemalloc.start()
    try:
        reader.feed(struct.pack("<I", 2**32 - 1) + b"\x00" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert reader.inside_frame


BAD_JSON = {
    "not an object": ([1, 2], "object with 'dtype', 'shape' and 'data'"),
    "missing shape": ({"dtype": "F32", "data": [1.0]}, "'shape'"),
    "unknown dtype": ({"dtype": "float", "shape": [1], "data": [1.0]}, "unknown dtype"),
    "negative shape": ({"dtype": "F32", "shape": [-1], "data": []}, "non-negative"),
    "bool in shape": ({"dtype": "F32", "shape": [True], "data": [1.0]}, "non-negative integers"),
    "count mismatch": ({"dtype": "F32", "shape": [3], "data": [1.0, 2.0]}, "does not match shape"),
    "ragged nesting": ({"dtype": "I64", "shape": [2, 2], "data": [[1, 2], [3]]}, "does not match"),
    "too deep": ({"dtype": "I64", "shape": [2], "data": [[1], [2]]}, "nested deeper"),
    "string element": ({"dtype": "F32", "shape": [1], "data": ["1.0"]}, "not a valid F32"),
    "float for int": ({"dtype": "I32", "shape": [1], "data": [1.5]}, "not a valid I32"),
    "int for bool": ({"dtype": "BOOL", "shape": [1], "data": [1]}, "not a valid BOOL"),
    "overflow": ({"dtype": "I8", "shape": [1], "data": [300]}, "does not fit I8"),
    "scalar for matrix": ({"dtype": "F32", "shape": [2], "data": 1.0}, "must be a list"),
}


@pytest.mark.parametrize("obj,expected", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_bad_json_tensor_raises_wire_format_error(obj: object, expected: str) -> None:
    with pytest.raises(WireFormatError, match=expected):
        tensor_from_json(obj)


def test_encoding_a_dtype_without_a_code_is_a_clear_error() -> None:
    with pytest.raises(WireFormatError, match="has no wire dtype code"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))
