"""What a validated request will cost, estimated before it runs: tokens, forwards, peak memory
and the size of its response (frames, or JSON when the client asked for JSON)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.shapes import axis_sizes, hook_shape

from ..settings import Settings
from .errors import too_large

# A JSON number as the server writes it ("-0.12345678901234567, ") takes up to ~24 bytes, and
# building it costs a Python float (24 bytes) plus a list slot (8) on the way.
JSON_BYTES_PER_FLOAT = 24
JSON_BUILD_BYTES_PER_FLOAT = 32 + JSON_BYTES_PER_FLOAT
# Measured peak/estimate ratios stay below this (the scheduler note's slack).
SLACK = 1.3


@dataclass(frozen=True)
class Cost:
    tokens: int  # token positions run through the model, over every forward
    forwards: int
    peak_bytes: int  # activations, working set, logits and response, at the peak
    response_bytes: int  # as sent: frames, or JSON text
    backward_bytes: int = 0  # of the peak: what a backward pass keeps (0: no backward)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_elements(
    model: HookedTransformer, names: Iterable[str], batch: int, pos: int
) -> int:
    sizes = axis_sizes(model.cfg, batch, pos)
    return sum(math.prod(sizes[axis] for axis in hook_shape(name, model.cfg)) for name in names)


def working_bytes(model: HookedTransformer, batch: int, pos: int) -> int:
    """Transients of one block: the widest matmul outputs, and the attention scores and pattern
    (every forward materialises them: TransformerLens's arithmetic, whatever is captured)."""
    cfg = model.cfg
    width = max(cfg.d_mlp, 3 * cfg.d_model)
    elements = 2 * batch * pos * width + 2 * batch * cfg.n_heads * pos * pos
    return elements * cfg.dtype.itemsize


def backward_bytes(model: HookedTransformer, batch: int, pos: int) -> int:
    """What a forward keeps for its backward pass, and the gradients at the peak: per layer and
    token the residual-width tensors (norm inputs and outputs, attention and MLP outputs, the
    residual at each point), q/k/v/z, the MLP's hidden activations and the attention scores and
    pattern; then the logits with their softmax and gradient."""
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    per_token = 12 * cfg.d_model + 4 * cfg.n_heads * cfg.d_head + 3 * d_mlp
    per_token += 3 * cfg.n_heads * pos
    logits = 3 * batch * pos * cfg.d_vocab_out
    return (cfg.n_layers * batch * pos * per_token + logits) * cfg.dtype.itemsize * 2


def response_size(elements: int, itemsize: int, wants_json: bool) -> tuple[int, int]:
    """(bytes sent, bytes held while building it) for ``elements`` tensor values."""
    if wants_json:
        return elements * JSON_BYTES_PER_FLOAT, elements * (JSON_BUILD_BYTES_PER_FLOAT + itemsize)
    return elements * itemsize, elements * itemsize


def check_response(size: int, wants_json: bool, settings: Settings) -> None:
    """Refuse (413) a response over the limit of its encoding, before any work runs."""
    if wants_json and size > settings.max_json_response_bytes:
        raise too_large(
            "bytes of JSON response (estimated)",
            size,
            settings.max_json_response_bytes,
            "max_json_response_bytes",
            "ask for frames (accept: application/vnd.hooklab.frames+msgpack), which are "
            "~5x smaller and stream without a copy, or ask for less",
        )
    if not wants_json and size > settings.max_response_bytes:
        raise too_large(
            "bytes of response (estimated)",
            size,
            settings.max_response_bytes,
            "max_response_bytes",
            "cache fewer hook points, or send a smaller batch",
        )


def with_slack(nbytes: int) -> int:
    return int(nbytes * SLACK)
