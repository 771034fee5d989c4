"""hooklab_proto — the wire contract shared by the hooklab server and client.

Tensors travel as msgpack maps whose payload is raw little-endian bytes (``encode_tensor`` /
``decode_frame``), in length-prefixed frame streams (``stream_chunks`` / ``StreamReader``), or as
JSON (``tensor_to_json`` / ``tensor_from_json``). The normative description is proto/README.md.
"""

from ._dtypes import DTYPE_CODES, dtype_code, torch_dtype
from ._frames import CONTROL_KINDS, ControlFrame, Frame, TensorFrame, decode_frame, encode_control
from ._json import tensor_from_json, tensor_to_json
from ._stream import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameReader,
    StreamReader,
    read_stream,
    stream_chunks,
    stream_length,
)
from ._tensor import FORMAT_VERSION, EncodedFrame, decode_tensor, encode_tensor
from .errors import TruncatedStreamError, WireFormatError

__all__ = [
    "CONTROL_KINDS",
    "DEFAULT_MAX_FRAME_BYTES",
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "ControlFrame",
    "EncodedFrame",
    "Frame",
    "FrameReader",
    "StreamReader",
    "TensorFrame",
    "TruncatedStreamError",
    "WireFormatError",
    "decode_frame",
    "decode_tensor",
    "dtype_code",
    "encode_control",
    "encode_tensor",
    "read_stream",
    "stream_chunks",
    "stream_length",
    "tensor_from_json",
    "tensor_to_json",
    "torch_dtype",
]
