"""Codec throughput: a 64 MiB float32 tensor encoded, streamed and decoded, against memcpy.

    make bench            (or: .venv/bin/python bench/codec.py)

The round trip is what a cache download costs on both ends minus the socket: encode_tensor +
stream_chunks on the server, StreamReader on the client (which copies each frame once into its
own aligned buffer and views the tensor in place). The reference is one memcpy of the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _table import median_seconds, print_table

from hooklab_proto import (
    StreamReader,
    TensorFrame,
    encode_control,
    encode_tensor,
    stream_chunks,
)

SIZE = 64 * 2**20
RUNS = 9
HTTP_CHUNK = 64 * 1024


def main() -> None:
    torch.set_num_threads(1)
    tensor = torch.randn(SIZE // 4)
    source = memoryview(tensor.numpy()).cast("B")
    destination = bytearray(SIZE)

    def memcpy() -> None:
        memoryview(destination)[:] = source

    def encode() -> list:
        frames = [encode_control("begin"), encode_tensor(tensor, "x"), encode_control("end")]
        return list(stream_chunks(frames))

    chunks = encode()
    http_chunks = [
        bytes(part[i : i + HTTP_CHUNK])
        for part in map(memoryview, chunks)
        for i in range(0, part.nbytes, HTTP_CHUNK)
    ]

    def decode(pieces: list) -> torch.Tensor:
        reader = StreamReader()
        frames = [frame for piece in pieces for frame in reader.feed(piece)]
        reader.close()
        (result,) = [frame.tensor for frame in frames if isinstance(frame, TensorFrame)]
        return result

    assert torch.equal(decode(chunks), tensor) and torch.equal(decode(http_chunks), tensor)

    def round_trip() -> torch.Tensor:
        return decode(encode())

    naive_blob = msgspec.msgpack.encode({"data": source})

    def naive_msgpack() -> None:  # what a plain "put bytes in a map" codec costs
        msgspec.msgpack.decode(msgspec.msgpack.encode({"data": source}), type=dict)

    assert len(naive_blob) > SIZE

    timings = {
        "memcpy (reference)": median_seconds(memcpy, RUNS),
        "encode + stream_chunks": median_seconds(encode, RUNS),
        "decode (writer's chunks)": median_seconds(lambda: decode(chunks), RUNS),
        "decode (64 KiB chunks)": median_seconds(lambda: decode(http_chunks), RUNS),
        "round trip": median_seconds(round_trip, RUNS),
        "plain msgpack bytes round trip": median_seconds(naive_msgpack, RUNS),
    }
    reference = timings["memcpy (reference)"]
    rows = [
        [
            name,
            f"{seconds * 1e3:8.2f}",
            f"{SIZE / seconds / 1e9:6.2f}",
            f"{seconds / reference:5.2f}x",
        ]
        for name, seconds in timings.items()
    ]
    print(f"64 MiB float32, median of {RUNS} runs, torch threads = 1")
    print_table(["path", "ms", "GB/s", "time vs memcpy"], rows)


if __name__ == "__main__":
    main()
