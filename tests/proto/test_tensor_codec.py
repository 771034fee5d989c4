"""Tensor maps: round trips, zero-copy on both sides, and the byte layout the spec promises."""

from __future__ import annotations

import ctypes
import struct

import msgpack
import numpy as np
import pytest
import torch

from hooklab_proto import DTYPE_CODES, decode_frame, encode_tensor, torch_dtype

SHAPES = [(), (0,), (2, 0, 3), (7,), (3, 5), (2, 3, 4)]


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values representable exactly in ``code``'s dtype."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(code)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 8).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def address(buffer: bytearray | memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


@pytest.mark.parametrize("code", DTYPE_CODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(code: str, shape: tuple[int, ...]) -> None:
    tensor = sample(code, shape)
    frame = decode_frame(bytearray(encode_tensor(tensor, "blocks.0.hook_resid_pre").to_bytes()))
    name, decoded = frame.name, frame.tensor
    assert name == "blocks.0.hook_resid_pre"
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    # Compare bytes, not values: exact for every dtype, including float8 and NaN patterns.
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.T,
        lambda t: t[:, ::2],
        lambda t: t[1:, 1:].T,
        lambda t: t.unsqueeze(0).expand(3, -1, -1),
    ],
    ids=["transpose", "step", "slice-transpose", "expand"],
)
def test_non_contiguous_tensors_are_sent_in_c_order(make) -> None:
    view = make(torch.arange(30, dtype=torch.float32).reshape(5, 6))
    assert not view.is_contiguous()
    decoded = decode_frame(bytearray(encode_tensor(view).to_bytes())).tensor
    assert torch.equal(decoded, view)


def test_bf16_values_survive_bit_exactly() -> None:
    bits = torch.arange(0, 2**16, 97, dtype=torch.int32).to(torch.int16)  # every exponent range
    tensor = bits.view(torch.bfloat16)
    decoded = decode_frame(bytearray(encode_tensor(tensor).to_bytes())).tensor
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded.view(torch.int16), bits)


def test_encoding_does_not_copy_a_contiguous_cpu_tensor() -> None:
    tensor = torch.randn(256, 64)
    frame = encode_tensor(tensor)
    payload_address = np.frombuffer(frame.payload, dtype=np.uint8).ctypes.data
    assert payload_address == tensor.data_ptr()
    assert frame.payload.nbytes == tensor.numel() * 4


def test_decoded_tensor_views_the_received_buffer() -> None:
    tensor = torch.randn(16, 8, dtype=torch.float32)
    buffer = bytearray(encode_tensor(tensor).to_bytes())
    decoded = decode_frame(buffer).tensor
    start = address(buffer)
    assert start <= decoded.data_ptr() < start + len(buffer)
    # Writing the buffer shows through the tensor: it is a view, not a copy.
    offset = decoded.data_ptr() - start
    buffer[offset : offset + 4] = struct.pack("<f", 1234.5)
    assert decoded[0, 0].item() == 1234.5


def test_decoding_read_only_bytes_copies_once_and_stays_writable() -> None:
    tensor = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    decoded = decode_frame(encode_tensor(tensor).to_bytes()).tensor
    decoded += 1  # would be undefined behaviour on memory owned by an immutable bytes object
    assert torch.equal(decoded, tensor + 1)


def test_layout_read_by_an_independent_msgpack_decoder() -> None:
    """The map is plain msgpack: msgpack-python reads it, keys in order, data last and aligned."""
    tensor = torch.randn(3, 7).to(torch.float16)
    raw = encode_tensor(tensor, "hook_embed").to_bytes()
    mapping = msgpack.unpackb(raw, raw=False)
    assert list(mapping) == ["kind", "v", "name", "dtype", "shape", "pad", "data"]
    assert mapping["kind"] == "tensor" and mapping["v"] == 1
    assert mapping["name"] == "hook_embed" and mapping["dtype"] == "F16"
    assert mapping["shape"] == [3, 7]
    assert mapping["data"] == tensor.numpy().astype("<f2").tobytes()
    data_offset = len(raw) - len(mapping["data"])
    assert data_offset % 64 == 0
    assert raw[data_offset - 5] == 0xC6  # bin32, whatever the size
    assert struct.unpack(">I", raw[data_offset - 4 : data_offset])[0] == len(mapping["data"])


@pytest.mark.parametrize("name", ["", "x", "blocks.11.attn.hook_pattern", "ü" * 40, "n" * 300])
def test_data_is_aligned_for_any_name_length(name: str) -> None:
    frame = encode_tensor(torch.ones(5), name)
    assert len(frame.header) % 64 == 0
    assert decode_frame(bytearray(frame.to_bytes())).name == name
