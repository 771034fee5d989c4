"""Readers filled in place (``writable()`` / ``wrote(n)``, as a socket's ``recv_into`` fills them):
any write sizes, prefixes split anywhere, limits before allocation, truncation, order checks,
tensors viewing the very buffer that was written, and a fuzz of the same path."""

from __future__ import annotations

import contextlib
import random
import struct
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooklab_proto import (
    ControlFrame,
    EncodedFrame,
    Frame,
    FrameReader,
    StreamReader,
    TensorFrame,
    TruncatedStreamError,
    WireFormatError,
    encode_control,
    encode_tensor,
    stream_chunks,
)

TENSORS = {
    "hook_embed": torch.randn(2, 5, 16),
    "blocks.0.attn.hook_pattern": torch.rand(2, 4, 5, 5).to(torch.bfloat16),
    "tokens": torch.arange(10).reshape(2, 5),
    "loss": torch.tensor(3.25),
    "empty": torch.zeros(0, 16),
    "big": torch.randn(300, 257),  # large enough to go out as its own chunk
}
MAX_FRAME = 4096


def frames(tensors: dict[str, torch.Tensor] = TENSORS) -> list[EncodedFrame]:
    return [
        encode_control("begin", request_id="req-1"),
        *(encode_tensor(tensor, name) for name, tensor in tensors.items()),
        encode_control("end", stats={"bytes": 1}),
    ]


def encoded_stream(encoded: list[EncodedFrame]) -> bytes:
    return b"".join(bytes(chunk) for chunk in stream_chunks(encoded, coalesce_bytes=64))


def check_decoded(decoded: list[Frame], tensors: dict[str, torch.Tensor] = TENSORS) -> None:
    assert decoded[0] == ControlFrame("begin", {"request_id": "req-1"})
    assert decoded[-1] == ControlFrame("end", {"stats": {"bytes": 1}})
    middle = decoded[1:-1]
    assert [frame.kind for frame in middle] == ["tensor"] * len(tensors)
    assert [frame.name for frame in middle if isinstance(frame, TensorFrame)] == list(tensors)
    for frame, tensor in zip(middle, tensors.values(), strict=True):
        assert isinstance(frame, TensorFrame)
        assert torch.equal(frame.tensor, tensor)
        assert frame.tensor.numel() == 0 or frame.tensor.data_ptr() % 64 == 0


VALID = encoded_stream(frames({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4)}))


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


def write_in_place(
    reader: FrameReader | StreamReader, data: bytes, sizes: list[int] | None = None
) -> list[Frame]:
    """Write ``data`` into the reader's memory the way ``recv_into`` does: each write at most
    the writable region and at most the next of ``sizes`` (cycled; default: all it can take)."""
    decoded: list[Frame] = []
    position = 0
    step = 0
    while position < len(data):
        target = reader.writable()
        assert target.nbytes > 0 and not target.readonly
        size = sizes[step % len(sizes)] if sizes else target.nbytes
        step += 1
        n = min(target.nbytes, size, len(data) - position)
        target[:n] = data[position : position + n]
        position += n
        decoded += reader.wrote(n)
    return decoded


def read_in_place(data: bytes, sizes: list[int] | None = None, **limits: int) -> list[Frame]:
    reader = StreamReader(**limits)
    decoded = write_in_place(reader, data, sizes)
    reader.close()
    return decoded


def test_whole_frames_at_a_time() -> None:
    check_decoded(read_in_place(encoded_stream(frames())))


def test_byte_by_byte() -> None:
    check_decoded(read_in_place(encoded_stream(frames()), sizes=[1]))


@pytest.mark.parametrize("sizes", [[2], [3], [1, 3], [3, 1, 2, 7], [5, 64, 4096]])
def test_prefixes_split_anywhere(sizes: list[int]) -> None:
    check_decoded(read_in_place(encoded_stream(frames()), sizes=sizes))


def test_random_write_sizes() -> None:
    data = encoded_stream(frames())
    rng = random.Random(0)
    for _ in range(20):
        check_decoded(read_in_place(data, sizes=[rng.randint(1, 200) for _ in range(30)]))


def test_the_writable_region_is_the_prefix_then_the_frame() -> None:
    frame = encode_tensor(torch.arange(6, dtype=torch.int16), "x")
    reader = FrameReader()
    assert reader.writable().nbytes == 4
    target = reader.writable()
    target[:3] = struct.pack("<I", frame.nbytes)[:3]
    assert reader.wrote(3) == [] and reader.inside_frame
    assert reader.writable().nbytes == 1
    reader.writable()[:1] = struct.pack("<I", frame.nbytes)[3:]
    assert reader.wrote(1) == []
    buffer = reader.writable()
    assert buffer.nbytes == frame.nbytes  # the whole frame's buffer, as soon as the prefix is read
    body = frame.header + bytes(frame.payload)
    buffer[:] = body
    (decoded,) = reader.wrote(len(body))
    assert isinstance(decoded, TensorFrame) and not reader.inside_frame
    assert torch.equal(decoded.tensor, torch.arange(6, dtype=torch.int16))
    assert reader.writable().nbytes == 4  # the next prefix


def test_tensors_view_the_buffer_that_was_written() -> None:
    """No copy after the write: the decoded tensor's memory is the writable region's, aligned."""
    tensor = torch.randn(64, 32)
    data = encoded_stream([encode_tensor(tensor, "t")])
    reader = FrameReader()
    reader.writable()[:4] = data[:4]
    reader.wrote(4)
    buffer = reader.writable()
    buffer[:] = data[4:]
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    (decoded,) = reader.wrote(buffer.nbytes)
    assert isinstance(decoded, TensorFrame) and torch.equal(decoded.tensor, tensor)
    assert start % 64 == 0
    assert start <= decoded.tensor.data_ptr() < start + buffer.nbytes
    assert decoded.tensor.data_ptr() % 64 == 0


def test_length_over_the_limit_is_refused_before_any_buffer() -> None:
    reader = FrameReader(max_frame_bytes=1024)
    tracemalloc.start()
    try:
        reader.writable()[:4] = struct.pack("<I", 2**32 - 1)
        with pytest.raises(WireFormatError, match="exceeds the limit of 1024 bytes"):
            reader.wrote(4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_a_frame_at_the_limit_is_read() -> None:
    frame = encode_control("begin", note="x" * 100)
    decoded = write_in_place(FrameReader(max_frame_bytes=frame.nbytes), encoded_stream([frame]))
    assert [f.kind for f in decoded] == ["begin"]


def test_zero_length_frame_is_refused() -> None:
    reader = FrameReader()
    reader.writable()[:4] = struct.pack("<I", 0)
    with pytest.raises(WireFormatError, match="frame length 0"):
        reader.wrote(4)


def test_every_truncation_point_raises_truncated_stream_error() -> None:
    data = encoded_stream(frames({"x": torch.arange(6, dtype=torch.int16)}))
    for cut in range(len(data)):
        with pytest.raises(TruncatedStreamError):
            read_in_place(data[:cut], sizes=[3])


def test_bytes_after_the_end_frame_are_refused() -> None:
    reader = StreamReader()
    write_in_place(reader, encoded_stream([encode_control("begin"), encode_control("end")]))
    assert reader.finished
    reader.writable()[:1] = b"\x01"
    with pytest.raises(WireFormatError, match="bytes after the stream's 'end' frame"):
        reader.wrote(1)


def test_order_is_checked_as_for_fed_chunks() -> None:
    data = encoded_stream([encode_tensor(torch.ones(1)), encode_control("end")])
    with pytest.raises(WireFormatError, match="starts with a 'begin' frame"):
        read_in_place(data)


def test_writing_past_the_writable_region_is_refused() -> None:
    reader = FrameReader()
    with pytest.raises(ValueError, match="past the writable part of the length prefix"):
        reader.wrote(5)
    reader.writable()[:4] = struct.pack("<I", 10)
    reader.wrote(4)
    assert reader.writable().nbytes == 10
    with pytest.raises(ValueError, match="past the end of the current frame"):
        reader.wrote(11)


def test_feeding_and_writing_in_place_mix() -> None:
    """Chunks fed before the buffer exists land in it when writable() makes it."""
    data = encoded_stream(frames())
    rng = random.Random(1)
    reader = StreamReader()
    decoded: list[Frame] = []
    position = 0
    while position < len(data):
        size = min(rng.randint(1, 300), len(data) - position)
        if rng.random() < 0.5:
            decoded += reader.feed(data[position : position + size])
            position += size
        else:
            target = reader.writable()
            n = min(size, target.nbytes)
            target[:n] = data[position : position + n]
            decoded += reader.wrote(n)
            position += n
    reader.close()
    check_decoded(decoded, TENSORS)


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=512), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_fuzz_random_bytes_raise_only_wire_format_error(data: bytes, sizes: list[int]) -> None:
    with contextlib.suppress(WireFormatError):
        read_in_place(data, sizes, max_frame_bytes=MAX_FRAME)


@settings(max_examples=500, deadline=1000)
@given(mutated_streams(), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_fuzz_mutated_streams_raise_only_wire_format_error(data: bytes, sizes: list[int]) -> None:
    with contextlib.suppress(WireFormatError):
        read_in_place(data, sizes, max_frame_bytes=MAX_FRAME)


def test_the_fuzzed_stream_itself_decodes() -> None:
    assert [f.kind for f in read_in_place(VALID, [7])] == ["begin", "tensor", "end"]
