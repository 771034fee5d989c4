"""Frame streams: the writer's length, chunk-size independence, truncation and ordering errors,
and a property-based fuzz of the reader."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooklab_proto import (
    ControlFrame,
    EncodedFrame,
    FrameReader,
    StreamReader,
    TensorFrame,
    TruncatedStreamError,
    WireFormatError,
    encode_control,
    encode_tensor,
    read_stream,
    stream_chunks,
    stream_length,
)

TENSORS = {
    "hook_embed": torch.randn(2, 5, 16),
    "blocks.0.attn.hook_pattern": torch.rand(2, 4, 5, 5).to(torch.bfloat16),
    "tokens": torch.arange(10).reshape(2, 5),
    "loss": torch.tensor(3.25),
    "empty": torch.zeros(0, 16),
}


def frames(tensors: dict[str, torch.Tensor] = TENSORS) -> list[EncodedFrame]:
    return [
        encode_control("begin", request_id="req-1", n_frames=len(tensors)),
        *(encode_tensor(tensor, name) for name, tensor in tensors.items()),
        encode_control("end", stats={"bytes": 1}),
    ]


def stream_bytes(encoded: list[EncodedFrame], coalesce_bytes: int = 1 << 20) -> bytes:
    return b"".join(bytes(chunk) for chunk in stream_chunks(encoded, coalesce_bytes))


def check_decoded(decoded: list, tensors: dict[str, torch.Tensor] = TENSORS) -> None:
    assert decoded[0] == ControlFrame("begin", {"request_id": "req-1", "n_frames": len(tensors)})
    assert decoded[-1] == ControlFrame("end", {"stats": {"bytes": 1}})
    middle = decoded[1:-1]
    assert [frame.name for frame in middle] == list(tensors)
    for frame, tensor in zip(middle, tensors.values(), strict=True):
        assert isinstance(frame, TensorFrame)
        assert torch.equal(frame.tensor, tensor)


@pytest.mark.parametrize("coalesce_bytes", [1, 64, 1 << 20])
def test_declared_length_equals_the_bytes_yielded(coalesce_bytes: int) -> None:
    big = {**TENSORS, "big": torch.randn(512, 1024)}  # 2 MiB payload goes out as a view
    encoded = frames(big)
    chunks = list(stream_chunks(encoded, coalesce_bytes))
    assert sum(memoryview(chunk).nbytes for chunk in chunks) == stream_length(encoded)
    check_decoded(list(read_stream(chunks)), big)


def test_large_payloads_are_yielded_without_copying() -> None:
    tensor = torch.randn(1024, 1024)
    chunks = list(stream_chunks([encode_tensor(tensor, "big")]))
    views = [chunk for chunk in chunks if isinstance(chunk, memoryview)]
    assert len(views) == 1 and views[0].nbytes == tensor.numel() * 4


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 4096, 10**9])
def test_reader_is_independent_of_chunk_sizes(chunk_size: int) -> None:
    data = stream_bytes(frames())
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    check_decoded(list(read_stream(chunks)))


def test_reader_with_random_chunk_boundaries() -> None:
    data = stream_bytes(frames())
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 15))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        check_decoded(list(read_stream(chunks)))


def test_decoded_tensors_are_64_byte_aligned_in_memory() -> None:
    decoded = list(read_stream([stream_bytes(frames())]))
    for frame in decoded:
        if isinstance(frame, TensorFrame) and frame.tensor.numel():
            assert frame.tensor.data_ptr() % 64 == 0


def test_every_truncation_point_raises_truncated_stream_error() -> None:
    data = stream_bytes(frames({"x": torch.arange(6, dtype=torch.int16)}))
    for cut in range(len(data)):
        with pytest.raises(TruncatedStreamError):
            list(read_stream([data[:cut]]))


def test_error_frame_ends_a_stream() -> None:
    encoded = [
        encode_control("begin"),
        encode_tensor(torch.ones(2), "a"),
        encode_control("error", code="out_of_memory", message="activation memory exceeded"),
    ]
    decoded = list(read_stream([stream_bytes(encoded)]))
    assert decoded[-1] == ControlFrame(
        "error", {"code": "out_of_memory", "message": "activation memory exceeded"}
    )


@pytest.mark.parametrize(
    "encoded,expected",
    [
        ([encode_tensor(torch.ones(1)), encode_control("end")], "starts with a 'begin' frame"),
        ([encode_control("begin"), encode_control("begin")], "second 'begin'"),
        (
            [encode_control("begin"), encode_control("end"), encode_tensor(torch.ones(1))],
            "after the stream's final frame",
        ),
    ],
    ids=["no-begin", "two-begins", "after-end"],
)
def test_stream_order_violations(encoded: list[EncodedFrame], expected: str) -> None:
    with pytest.raises(WireFormatError, match=expected):
        list(read_stream([stream_bytes(encoded)]))


def test_bytes_after_the_end_frame_in_a_later_chunk() -> None:
    reader = StreamReader()
    reader.feed(stream_bytes([encode_control("begin"), encode_control("end")]))
    with pytest.raises(WireFormatError, match="bytes after the stream's 'end' frame"):
        reader.feed(b"\x01")


def test_partial_frame_after_the_end_frame() -> None:
    reader = StreamReader()
    reader.feed(stream_bytes([encode_control("begin"), encode_control("end")]) + b"\x05\x00")
    with pytest.raises(WireFormatError, match="bytes after"):
        reader.close()


def test_control_frames_refuse_unknown_kinds_when_encoding() -> None:
    with pytest.raises(ValueError, match="control frame kind"):
        encode_control("tensor")
    with pytest.raises(ValueError, match="'code' and 'message'"):
        encode_control("error", message="no code")


# --- property-based fuzz ---------------------------------------------------------------------

VALID = stream_bytes(frames({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4)}))
MAX_FRAME = 4096


def feed_all(data: bytes, chunk_sizes: list[int]) -> None:
    """Feed ``data`` in chunks and close; any failure must be the documented exception."""
    reader = StreamReader(max_frame_bytes=MAX_FRAME)
    sizes = iter(chunk_sizes or [len(data) or 1])
    position = 0
    while position < len(data):
        size = max(1, next(sizes, len(data)))
        reader.feed(data[position : position + size])
        position += size
    reader.close()


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=512), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_random_bytes_raise_only_wire_format_error(data: bytes, sizes: list[int]) -> None:
    with contextlib.suppress(WireFormatError):
        feed_all(data, sizes)


@settings(max_examples=500, deadline=1000)
@given(mutated_streams(), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_mutated_streams_raise_only_wire_format_error(data: bytes, sizes: list[int]) -> None:
    with contextlib.suppress(WireFormatError):
        feed_all(data, sizes)


@settings(max_examples=200, deadline=1000)
@given(st.integers(MAX_FRAME + 1, 2**32 - 1), st.binary(max_size=64))
def test_fuzz_oversize_lengths_are_refused_at_once(size: int, tail: bytes) -> None:
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        FrameReader(max_frame_bytes=MAX_FRAME).feed(struct.pack("<I", size) + tail)
