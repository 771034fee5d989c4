"""Rewrite the golden vector files from vectors.json (run after a deliberate format change).

python proto/vectors/regenerate.py
"""

from __future__ import annotations

import json
from pathlib import Path

from hooklab_proto import encode_control, encode_tensor, stream_chunks, tensor_from_json

HERE = Path(__file__).parent


def main() -> None:
    spec = json.loads((HERE / "vectors.json").read_text())
    encoded = {}
    for entry in spec["tensors"]:
        tensor = tensor_from_json(
            {k: entry[k] for k in ("dtype", "shape")} | {"data": entry["values"]}
        )
        encoded[entry["file"]] = encode_tensor(tensor, entry["name"])
        (HERE / entry["file"]).write_bytes(encoded[entry["file"]].to_bytes())
    frames = [
        encoded[frame["file"]] if frame["kind"] == "tensor" else encode_control(**frame)
        for frame in spec["stream"]["frames"]
    ]
    stream = b"".join(bytes(chunk) for chunk in stream_chunks(frames))
    (HERE / spec["stream"]["file"]).write_bytes(stream)


if __name__ == "__main__":
    main()
