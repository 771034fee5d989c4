"""Hostile requests against the real server (issue 8): runaway work and resource bounds.

Every row of ``ROWS`` is one careless or hostile request (or, for the store, a short sequence).
The server is the real ``hooklab-server`` started as a subprocess on a free loopback port, so its
memory can be read from ``/proc/<pid>/status``. For each row, while a thread asks ``GET /healthz``
every 100 ms:

* the answer is the expected status and error code (or a correct 200 for "bounded 200" rows),
  within ``Row.seconds`` (10 s unless stated);
* every ``/healthz`` answered within ``HEALTHZ_S`` (1 s) while the request ran;
* the server's resident memory grew by less than ``RSS_BOUND`` (300 MB) over the request: the
  peak (``VmHWM``, reset before the row; and ``VmRSS`` sampled by the poller) minus ``VmRSS``
  just before it;
* afterwards the server is alive and a normal forward still gives Hugging Face transformers'
  logits on the same checkpoint (``log_softmax`` within 1e-4: the server folds LayerNorm and
  centres the unembedding by default).

Other tests drive the connection edge with raw sockets: half-sent headers, half-sent bodies, a
slow reader, aborted uploads.

This table is about runaway work and resource bounds; malformed requests in general are
tests/e2e/test_bad_input.py's. Expected results follow the contract of issue 8
(/work/notes/contract.md): every "too large" is 413 ``too_large``, bad numbers 422 naming the
field, streams end with an in-band ``error`` event, Host headers other than the loopback names
get 400 ``bad_host``, work past ``timeout_s`` 504 ``deadline_exceeded``. Where a 413 should come
from one particular setting, the message or hint must name it (``says``).

The model is the session's tiny seeded GPT-2 (``gpt2_checkpoint``: 2 layers, d_model 64, 4 heads,
d_mlp 256, vocab 1000, n_ctx 128, 52 hook points). The server runs with ``SETTINGS``, small
enough for 2 CPU cores and chosen so that each row hits the limit it is about (and only that
one)::

    --device cpu
    --max-request-bytes 8MiB       --max-request-items 1000000    --max-text-chars 100000
    --max-tokens 4096              --max-batch 32                 --max-specs 64
    --max-selector-length 256      --max-names 256                --max-hook-applications 256
    --max-patching-rows 2000       --max-patching-forwards 64     --patching-budget-bytes 128MiB
    --max-response-bytes 64MiB     --max-json-response-bytes 512KiB
    --request-timeout-s 20         --max-timeout-s 30
    --header-timeout-s 2           --body-timeout-s 2             --write-timeout-s 2
    --max-stored-objects 50        --max-stored-bytes 64MiB       --store-ttl-s 600

(A server whose CLI does not take these flags yet gets them as ``HOOKLAB_*`` variables.)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM

from .server_process import HealthPoller, ServerProcess, server_process

# --- the server ---------------------------------------------------------------------------------

SETTINGS: dict[str, str] = {
    "device": "cpu",
    "max_request_bytes": "8MiB",
    "max_request_items": "1000000",
    "max_text_chars": "100000",
    "max_tokens": "4096",
    "max_batch": "32",
    "max_specs": "64",
    "max_selector_length": "256",
    "max_names": "256",
    "max_hook_applications": "256",
    "max_patching_rows": "2000",
    "max_patching_forwards": "64",
    "patching_budget_bytes": "128MiB",
    "max_response_bytes": "64MiB",
    "max_json_response_bytes": "512KiB",
    "request_timeout_s": "20",
    "max_timeout_s": "30",
    "header_timeout_s": "2",
    "body_timeout_s": "2",
    "write_timeout_s": "2",
    "max_stored_objects": "50",
    "max_stored_bytes": "64MiB",
    "store_ttl_s": "600",
}
HEADER_TIMEOUT_S = float(SETTINGS["header_timeout_s"])
BODY_TIMEOUT_S = float(SETTINGS["body_timeout_s"])
WRITE_TIMEOUT_S = float(SETTINGS["write_timeout_s"])
MAX_STORED_OBJECTS = int(SETTINGS["max_stored_objects"])

# --- the bounds every row is held to -----------------------------------------------------------

HEALTHZ_S = 1.0  # every /healthz while a row runs
ROW_SECONDS = 10.0  # the answer to a row (Row.seconds)
RSS_BOUND = 300 * 2**20  # growth of the server's resident memory over one row
SLACK_S = 3.0  # on top of a header/body/write timeout before the server must have closed
LOGPROB_TOLERANCE = 1e-4

# --- the model (tests/fixtures/checkpoints.py, gpt2_checkpoint) --------------------------------

D_MODEL, D_MLP, N_HEADS, VOCAB, N_CTX, N_LAYERS, N_HOOK_POINTS = 64, 256, 4, 1000, 128, 2, 52
REF_TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11]]  # the normal request checked after every row

JSON = "application/json"
MSGPACK = "application/msgpack"
FRAMES = "application/vnd.hooklab.frames+msgpack"
SSE = "text/event-stream"


def ids(batch: int, pos: int, seed: int = 0) -> list[list[int]]:
    """Deterministic token ids in 3..999 (no special tokens)."""
    return [
        [(seed * 31 + row * 7 + col * 13) % 997 + 3 for col in range(pos)] for row in range(batch)
    ]


def f32_tensor(values: list[float]) -> dict[str, Any]:
    """A msgpack tensor map (proto/README.md §1): raw little-endian F32 bytes."""
    return {
        "kind": "tensor", "v": 1, "name": "", "dtype": "F32", "shape": [len(values)],
        "pad": b"", "data": struct.pack(f"<{len(values)}f", *values),
    }  # fmt: skip


SCALE_1 = {"hook": "hook_embed", "op": "scale", "factor": 1.0}
STAR_1 = {"hook": "*", "op": "scale", "factor": 1.0}
NAN_VECTOR_JSON = {"dtype": "F32", "shape": [D_MODEL], "data": ["NaN"] * D_MODEL}
NAN_VECTOR_BIN = f32_tensor([math.nan] * D_MODEL)
GEN = {"input": [[5, 6, 7]], "max_new_tokens": 4}
LONG_TEXT = "def f(x): return x + 1\n" * 40  # ~900 characters, several hundred tokens > n_ctx
LOGIT_DIFF = {"kind": "logit_diff", "answer": 5, "wrong": 6}
# Rows of the patches_per_forward row: all in one forward, as a client may ask, is ~0.5 GB of
# activations here; lowered to the 128 MiB budget it stays well within max_patching_forwards.
PATCHED_ROWS = 1000


def patching(activation: str, axes: list[str], pos: int, **fields: Any) -> dict[str, Any]:
    return {
        "corrupted": ids(1, pos), "clean": ids(1, pos, seed=1), "activation": activation,
        "axes": axes, "metric": LOGIT_DIFF, **fields,
    }  # fmt: skip


def steer(vector: Any, hook: str = "blocks.0.hook_resid_pre") -> dict[str, Any]:
    return {"hook": hook, "op": "steer", "vector": vector}


# --- checks of "bounded 200" answers -----------------------------------------------------------


class Reference(NamedTuple):
    logprobs: torch.Tensor  # Hugging Face's log_softmax on REF_TOKENS, [1, 8, vocab]


def logprob_gap(body: dict[str, Any], reference: Reference) -> float:
    logits = torch.tensor(body["tensors"]["output.logits"]["data"], dtype=torch.float32)
    if logits.shape != reference.logprobs.shape:
        return math.inf
    return float((logits.log_softmax(-1) - reference.logprobs).abs().max())


def logits_match(response: httpx.Response, reference: Reference) -> str | None:
    """A JSON forward on REF_TOKENS whose hooks change nothing: Hugging Face's answer."""
    gap = logprob_gap(response.json(), reference)
    return None if gap < LOGPROB_TOLERANCE else f"log_softmax differs from HF by {gap:.3g}"


def frames_of_at_least(size: int) -> Callable[[httpx.Response, Reference], str | None]:
    def check(response: httpx.Response, reference: Reference) -> str | None:
        media = response.headers.get("content-type", "")
        if not media.startswith(FRAMES):
            return f"content-type {media!r}, expected {FRAMES}"
        if len(response.content) < size:
            return f"{len(response.content)} bytes of frames, expected at least {size}"
        return None

    return check


def generated(response: httpx.Response, reference: Reference) -> str | None:
    """A generate answer (JSON, or an SSE stream already checked to end with ``done``)."""
    if response.headers.get("content-type", "").startswith(SSE):
        return None
    tokens = response.json().get("tokens")
    if not tokens or not all(0 <= token < VOCAB for row in tokens for token in row):
        return f"tokens {tokens!r} are not token ids of the vocabulary"
    return None


def patching_capped(response: httpx.Response, reference: Reference) -> str | None:
    """patches_per_forward above the memory budget is lowered to it (meta copies_per_forward)."""
    body = response.json()
    copies = body.get("copies_per_forward")
    if not isinstance(copies, int) or copies >= 10**9:
        return f"copies_per_forward {copies!r}: the client's 10**9 was not lowered to the budget"
    metric = body["tensors"]["patching.metric"]
    if metric["shape"] != [PATCHED_ROWS]:
        return f"patching.metric has shape {metric['shape']}, expected [{PATCHED_ROWS}]"
    return None


def has_objective(response: httpx.Response, reference: Reference) -> str | None:
    """A backward ran: its objective (here the loss, positive) came back."""
    objective = response.json()["tensors"].get("output.objective")
    if objective is None or not objective["data"] > 0:
        return f"output.objective missing or not a positive loss: {objective!r}"
    return None


# --- the table ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One hostile request. ``body``: a dict/list (sent as JSON, or msgpack with
    ``wire="msgpack"``), raw bytes, or a callable building either (big bodies are built just
    before their row, outside the timed part). ``status``/``code``: the expected answer (a tuple
    where the contract allows several); ``says``: a regex the error's message or hint must match.
    ``stream``: the error may instead arrive as the last ``event: error`` of a 200 SSE stream.
    ``check``: for a 200, what makes the answer correct. ``repeat``: send it up to this many
    times, stopping at the first non-2xx (store abuse)."""

    path: str
    body: Any = None
    status: int | tuple[int, ...] = 200
    code: str | tuple[str, ...] | None = None
    says: str | None = None
    method: str = "POST"
    wire: str = "json"  # json | msgpack (bytes bodies go as they are)
    content_type: str | None = None  # default: from wire
    accept: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    check: Callable[[httpx.Response, Reference], str | None] | None = None
    repeat: int = 1
    seconds: float = ROW_SECONDS

    def content(self) -> bytes | None:
        body = self.body() if callable(self.body) else self.body
        if body is None or isinstance(body, bytes):
            return body
        if self.wire == "msgpack":
            return msgpack.packb(body, use_bin_type=True)
        return json.dumps(body, allow_nan=False).encode()

    def request_headers(self, port: int) -> dict[str, str]:
        headers = {key: value.format(port=port) for key, value in self.headers.items()}
        media = self.content_type or (MSGPACK if self.wire == "msgpack" else JSON)
        if self.body is not None:
            headers.setdefault("content-type", media)
        if self.accept:
            headers.setdefault("accept", self.accept)
        return headers


def _flood(key: str, item: Any, count: int) -> Callable[[], Any]:
    return lambda: {"input": REF_TOKENS, key: [item] * count}


def _bad_ext() -> bytes:
    return msgpack.packb(msgpack.ExtType(42, b"\x00\x01\x02\x03"))


ROWS: dict[str, Row] = {
    # --- floods of specs, names, globs, items (max_specs / max_names / max_hook_applications /
    #     max_request_items): a length check before any item is validated
    "specs_flood_300k_empty_msgpack": Row(
        "/v1/run_with_hooks", _flood("hooks", {}, 300_000), 413, "too_large", "max_specs",
        wire="msgpack",
    ),
    "specs_flood_50k_json": Row(
        "/v1/run_with_hooks", _flood("hooks", SCALE_1, 50_000), 413, "too_large", "max_specs"
    ),
    "specs_one_over_limit": Row(
        "/v1/run_with_hooks", {"input": REF_TOKENS, "hooks": [SCALE_1] * 65}, 413, "too_large",
        "max_specs",
    ),
    "specs_at_limit": Row(
        "/v1/run_with_hooks", {"input": REF_TOKENS, "hooks": [SCALE_1] * 64}, accept=JSON,
        check=logits_match,
    ),
    "names_flood_200k_globs_json": Row(
        "/v1/run_with_cache", _flood("names", "*", 200_000), 413, "too_large", "max_names"
    ),
    "names_flood_200k_msgpack": Row(
        "/v1/run_with_cache", _flood("names", "blocks.0.hook_resid_post", 200_000), 413,
        "too_large", "max_names", wire="msgpack",
    ),
    "names_one_over_limit": Row(
        "/v1/run_with_cache", {"input": REF_TOKENS, "names": ["hook_embed"] * 257}, 413,
        "too_large", "max_names",
    ),
    "glob_star_50_specs_on_128_tokens": Row(
        "/v1/run_with_hooks", {"input": ids(1, N_CTX), "hooks": [STAR_1] * 50}, 413, "too_large",
        "max_hook_applications",
    ),
    "glob_star_7_specs_over_applications": Row(  # 7 x 42 firing (52 in all) hook points > 256
        "/v1/run_with_hooks", {"input": REF_TOKENS, "hooks": [STAR_1] * 7}, 413, "too_large",
        "max_hook_applications",
    ),
    "glob_star_4_specs_within_applications": Row(  # 4 x 52 = 208 <= 256: runs, changes nothing
        "/v1/run_with_hooks", {"input": REF_TOKENS, "hooks": [STAR_1] * 4}, accept=JSON,
        check=logits_match,
    ),
    "items_flood_1_2M_msgpack": Row(
        "/v1/forward",
        lambda: {"input": {"dtype": "I64", "shape": [1, 8], "data": [5] * 1_200_000}},
        413, "too_large", "max_request_items", wire="msgpack",
    ),
    # --- selectors: repeated indices (no index product), lengths (max_selector_length)
    "selector_repeated_10000_pos_neuron": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "blocks.0.mlp.hook_post", "op": "ablate",
                                         "pos": [0] * 10_000, "neuron": [0] * 10_000}]},
        413, "too_large", "max_selector_length",
    ),
    "selector_repeated_at_length_limit": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "blocks.0.mlp.hook_post", "op": "ablate",
                                         "pos": [0] * 256, "neuron": [0] * 256}]},
        422, "bad_index",
    ),
    "selector_repeated_after_negative": Row(  # 1 and -7 are the same position of 8
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "blocks.0.hook_resid_post", "op": "ablate",
                                         "pos": [1, -7]}]},
        422, "bad_index",
    ),
    "selector_repeated_head": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "blocks.1.attn.hook_z", "op": "ablate",
                                         "head": [2, 2]}]},
        422, "bad_index",
    ),
    "selector_one_over_length": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "unembed.hook_out", "op": "ablate",
                                         "neuron": list(range(257))}]},  # all valid: d_vocab
        413, "too_large", "max_selector_length",
    ),
    "selector_index_2_63": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "blocks.0.hook_resid_post", "op": "ablate",
                                         "pos": [2**63 - 1]}]},
        422, ("bad_index", "validation_error"),
    ),
    # --- text and token ids: bounded before tokenising, never cut to the context
    "text_over_max_chars": Row(
        "/v1/forward", {"input": "a " * 60_000}, 413, "too_large", "max_text_chars"
    ),
    "text_1MB": Row(
        "/v1/forward", lambda: {"input": "x " * 500_000}, 413, "too_large", "max_text_chars"
    ),
    "tokenize_over_max_chars": Row(
        "/v1/tokenize", {"input": "a " * 60_000}, 413, "too_large", "max_text_chars"
    ),
    "text_over_context": Row(
        "/v1/forward", {"input": LONG_TEXT}, 413, "too_large", r"context|n_ctx|128"
    ),
    "texts_one_over_context": Row(
        "/v1/forward", {"input": ["def f(x):", LONG_TEXT]}, 413, "too_large",
        r"context|n_ctx|128",
    ),
    "generate_text_over_context": Row(
        "/v1/generate", {"input": LONG_TEXT, "max_new_tokens": 1}, 413, "too_large",
        r"context|n_ctx|128",
    ),
    "token_ids_flood_500k_json": Row(
        "/v1/forward", lambda: {"input": [[5] * 1000] * 500}, 413, "too_large", "max_tokens"
    ),
    "token_ids_1M_msgpack_bin": Row(
        "/v1/forward",
        lambda: {"input": {"kind": "tensor", "v": 1, "name": "", "dtype": "I64",
                           "shape": [1, 1_000_000], "pad": b"", "data": bytes(8_000_000)}},
        413, "too_large", wire="msgpack",
    ),
    # --- JSON responses: estimated before the work, refused over max_json_response_bytes with a
    #     hint to ask for frames; frames bounded by max_response_bytes
    "weights_W_E_as_json": Row(
        "/v1/weights/W_E", None, 413, "too_large", "frames", method="GET", accept=JSON
    ),
    "weights_W_E_as_frames": Row(
        "/v1/weights/W_E", None, method="GET", accept=FRAMES,
        check=frames_of_at_least(VOCAB * D_MODEL * 4),
    ),
    "forward_8x128_as_json": Row(
        "/v1/forward", {"input": ids(8, N_CTX)}, 413, "too_large", "frames", accept=JSON
    ),
    "cache_everything_2x64_as_json": Row(
        "/v1/run_with_cache", {"input": ids(2, 64), "names": None}, 413, "too_large", "frames",
        accept=JSON,
    ),
    "cache_everything_32x128_as_frames": Row(
        "/v1/run_with_cache", {"input": ids(32, N_CTX), "names": None}, 413, "too_large",
        accept=FRAMES,
    ),
    "forward_32x128_as_frames": Row(  # max_tokens exactly: 16 MB of logits, bounded
        "/v1/forward", {"input": ids(32, N_CTX)}, accept=FRAMES,
        check=frames_of_at_least(32 * N_CTX * VOCAB * 4),
    ),
    # --- patching: rows, forwards, and a client's patches_per_forward under the memory budget
    "patching_patches_per_forward_1e9": Row(  # 1000 pattern rows at 128 positions
        "/v1/patching",
        lambda: patching(
            "pattern", ["layer", "head", "dest_pos", "src_pos"], N_CTX,
            index=[[i % 2, (i // 2) % 4, 127 - (i // 8) % 128, (i // 8) % 128]
                   for i in range(PATCHED_ROWS)],
            patches_per_forward=10**9,
        ),
        accept=JSON, check=patching_capped,
    ),
    "patching_forwards_over_limit": Row(  # 1024 rows, one per forward > 64 forwards
        "/v1/patching", patching("z", ["layer", "pos", "head"], N_CTX, patches_per_forward=1),
        413, "too_large", "max_patching_forwards",
    ),
    "patching_rows_one_over_limit": Row(
        "/v1/patching",
        patching("resid_pre", ["layer", "pos"], 8, index=[[0, 0]] * 2001),
        413, "too_large", "max_patching_rows",
    ),
    "patching_rows_flood_100k": Row(
        "/v1/patching",
        lambda: patching("resid_pre", ["layer", "pos"], 8,
                         index=[[i % 2, i % 8] for i in range(100_000)]),
        413, "too_large", "max_patching_rows",
    ),
    "patching_all_combinations_over_rows": Row(  # 2 x 4 x 32 x 32 = 8192 rows
        "/v1/patching", patching("pattern", ["layer", "head", "dest_pos", "src_pos"], 32),
        413, "too_large", "max_patching_rows",
    ),
    # --- numeric edge cases: 422 naming the field (or, where harmless, a correct 200)
    "generate_temperature_1e-45": Row(  # a denormal temperature: greedy-like 200, or refused
        "/v1/generate", {**GEN, "temperature": 1e-45}, (200, 422), "validation_error",
        "temperature", accept=JSON, check=generated,
    ),
    "generate_freq_penalty_inf_msgpack": Row(
        "/v1/generate", {**GEN, "freq_penalty": math.inf}, 422, "validation_error",
        "freq_penalty", wire="msgpack",
    ),
    "generate_steer_nan_json": Row(
        "/v1/generate", {**GEN, "hooks": [steer(NAN_VECTOR_JSON)]}, 422,
        ("validation_error", "bad_shape"), r"vector|nan|finite",
    ),
    "generate_steer_nan_msgpack_bin": Row(
        "/v1/generate", {**GEN, "hooks": [steer(NAN_VECTOR_BIN)]}, 422,
        ("validation_error", "bad_shape"), r"vector|nan|finite", wire="msgpack",
    ),
    "generate_scale_inf_msgpack": Row(
        "/v1/generate",
        {**GEN, "hooks": [{"hook": "blocks.0.hook_resid_pre", "op": "scale", "factor": math.inf}]},
        422, "validation_error", "factor", wire="msgpack",
    ),
    "generate_empty_input_without_bos": Row(
        "/v1/generate", {"input": "", "prepend_bos": False, "max_new_tokens": 4}, 422,
        ("validation_error", "bad_shape"),
    ),
    "generate_eos_token_id_2_64": Row(
        "/v1/generate", {**GEN, "eos_token_id": 2**64 - 1}, 422,
        ("validation_error", "bad_index"), "eos",
    ),
    "generate_seed_2_70": Row(  # not even a 64-bit number: the decoder or the schema refuses it
        "/v1/generate", {**GEN, "seed": 2**70}, (400, 422), ("bad_request", "validation_error"),
    ),
    "generate_seed_2_64_minus_1": Row(  # the largest seed is fine
        "/v1/generate", {**GEN, "seed": 2**64 - 1}, accept=JSON, check=generated
    ),
    "forward_steer_nan_json": Row(
        "/v1/run_with_hooks", {"input": REF_TOKENS, "hooks": [steer(NAN_VECTOR_JSON)]}, 422,
        ("validation_error", "bad_shape"), r"vector|nan|finite",
    ),
    "forward_set_inf_msgpack": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "hook_embed", "op": "set", "value": math.inf}]},
        422, "validation_error", "value", wire="msgpack",
    ),
    "forward_empty_input_without_bos": Row(
        "/v1/forward", {"input": "", "prepend_bos": False}, 422, ("validation_error", "bad_shape")
    ),
    "store_shape_2_64_by_0_json": Row(
        "/v1/tensors", {"tensor": {"dtype": "F32", "shape": [2**64 - 1, 0], "data": []}}, 422,
        ("validation_error", "bad_shape"), "shape",
    ),
    "store_shape_2_64_by_0_msgpack": Row(
        "/v1/tensors",
        {"tensor": {"kind": "tensor", "v": 1, "name": "", "dtype": "F32",
                    "shape": [2**64 - 1, 0], "pad": b"", "data": b""}},
        422, ("validation_error", "bad_shape"), "shape", wire="msgpack",
    ),
    "weight_with_10000_digit_layer": Row(
        f"/v1/weights/blocks.{'9' * 10_000}.attn.W_Q", None, (404, 422),
        ("not_found", "validation_error", "bad_index"), method="GET",
    ),
    # --- the same failures with stream: true: a 4xx before the stream, or its last event is an
    #     in-band error (never a bare close)
    "stream_steer_nan": Row(
        "/v1/generate", {**GEN, "stream": True, "hooks": [steer(NAN_VECTOR_JSON)]}, 422,
        ("validation_error", "bad_shape"), stream=True,
    ),
    "stream_empty_input_without_bos": Row(
        "/v1/generate", {"input": "", "prepend_bos": False, "max_new_tokens": 4, "stream": True},
        422, ("validation_error", "bad_shape"), stream=True,
    ),
    "stream_eos_token_id_2_64": Row(
        "/v1/generate", {**GEN, "stream": True, "eos_token_id": 2**64 - 1}, 422,
        ("validation_error", "bad_index"), stream=True,
    ),
    "stream_temperature_1e-45": Row(
        "/v1/generate", {**GEN, "stream": True, "temperature": 1e-45}, (200, 422),
        "validation_error", stream=True, check=generated,
    ),
    # --- runaway work: timeout_s is a deadline (capped by max_timeout_s)
    "forward_deadline": Row(
        "/v1/run_with_cache",
        {"input": ids(32, N_CTX), "names": ["blocks.*.attn.hook_pattern"], "timeout_s": 0.001},
        504, "deadline_exceeded", accept=FRAMES,
    ),
    "patching_deadline": Row(
        "/v1/patching", patching("z", ["layer", "pos", "head"], N_CTX, timeout_s=0.01), 504,
        "deadline_exceeded",
    ),
    "generate_deadline": Row(
        "/v1/generate", {"input": ids(8, 8), "max_new_tokens": 110, "timeout_s": 0.01}, 504,
        "deadline_exceeded",
    ),
    "generate_stream_deadline": Row(
        "/v1/generate",
        {"input": ids(8, 8), "max_new_tokens": 110, "timeout_s": 0.01, "stream": True},
        504, "deadline_exceeded", stream=True,
    ),
    "timeout_s_above_max_is_capped": Row(
        "/v1/forward", {"input": REF_TOKENS, "timeout_s": 1e9}, accept=JSON, check=logits_match
    ),
    "timeout_s_inf_msgpack": Row(
        "/v1/forward", {"input": REF_TOKENS, "timeout_s": math.inf}, 422, "validation_error",
        "timeout_s", wire="msgpack",
    ),
    # --- lax parsing: strict bodies, no msgpack ext
    "msgpack_ext_as_whole_body": Row(
        "/v1/generate", _bad_ext, 400, "bad_request", content_type=MSGPACK
    ),
    "msgpack_ext_as_input": Row(
        "/v1/forward", {"input": msgpack.ExtType(5, b"abcd")}, 400, "bad_request",
        wire="msgpack",
    ),
    "ttl_s_as_string": Row(
        "/v1/tensors", {"tensor": {"dtype": "F32", "shape": [2], "data": [0.5, 0.5]},
                        "ttl_s": "60"},
        422, "validation_error", "ttl_s",
    ),
    "shape_true": Row(
        "/v1/tensors", {"tensor": {"dtype": "F32", "shape": [True], "data": [0.5]}}, 422,
        ("validation_error", "bad_shape"), "shape",
    ),
    "max_new_tokens_true": Row(
        "/v1/generate", {"input": [[5]], "max_new_tokens": True}, 422, "validation_error",
        "max_new_tokens",
    ),
    "factor_as_string": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "hook_embed", "op": "scale", "factor": "2"}]},
        422, "validation_error", "factor",
    ),
    "pos_selector_true": Row(
        "/v1/run_with_hooks",
        {"input": REF_TOKENS, "hooks": [{"hook": "hook_embed", "op": "ablate", "pos": True}]},
        422, "validation_error", "pos",
    ),
    # --- store: zero-size tensors still count (max_stored_objects)
    "store_zero_size_tensors_until_full": Row(
        "/v1/tensors", {"tensor": {"dtype": "F32", "shape": [0], "data": []}}, 507,
        "store_full", repeat=MAX_STORED_OBJECTS + 10,
    ),
    # --- Host headers (DNS rebinding against a loopback server)
    "host_evil": Row(
        "/v1/forward", {"input": REF_TOKENS}, 400, "bad_host", headers={"host": "evil.example"}
    ),
    "host_evil_with_port": Row(
        "/v1/model", None, 400, "bad_host", method="GET",
        headers={"host": "evil.example:{port}"},
    ),
    "host_loopback_lookalike": Row(
        "/v1/model", None, 400, "bad_host", method="GET",
        headers={"host": "127.0.0.1.evil.example:{port}"},
    ),
    "host_localhost_is_fine": Row(
        "/v1/forward", {"input": REF_TOKENS}, accept=JSON, headers={"host": "localhost:{port}"},
        check=logits_match,
    ),
    # --- gradients: backward hooks, the backward's memory, integrated-gradient steps
    "bwd_hooks_flood_300k_msgpack": Row(
        "/v1/run_with_cache",
        lambda: {"input": REF_TOKENS, "return_type": "loss", "bwd_hooks": [{}] * 300_000},
        413, "too_large", "max_specs", wire="msgpack",
    ),
    "incl_bwd_8_rows_at_context": Row(  # the backward's activations of 1024 tokens: bounded
        "/v1/run_with_cache",
        {"input": ids(8, N_CTX), "return_type": "loss", "incl_bwd": True,
         "names": ["blocks.0.hook_resid_pre"], "return_cache": False},
        accept=JSON, check=has_objective,
    ),
    "ig_steps_over_schema": Row(
        "/v1/integrated_gradients",
        {"input": REF_TOKENS, "steps": 10**9, "metric": {"kind": "logit", "answer": 3}},
        422, "validation_error",
    ),
    "ig_steps_over_forwards": Row(  # one step per forward at this size: 4096 > 64 forwards
        "/v1/integrated_gradients",
        {"input": ids(8, N_CTX), "steps": 4096, "metric": {"kind": "logit", "answer": 3}},
        413, "too_large", "max_patching_forwards",
    ),
    "ig_positions_flood": Row(
        "/v1/integrated_gradients",
        lambda: {"input": REF_TOKENS, "positions": [0] * 1_000_000,
                 "metric": {"kind": "logit", "answer": 3}},
        (413, 422), ("too_large", "validation_error"), wire="msgpack",
    ),
    "attribution_rows_over_limit": Row(
        "/v1/patching",
        {**patching("pattern", ["layer", "head_index", "dest_pos", "src_pos"], N_CTX),
         "method": "attribution",
         "metric": {"kind": "logit", "answer": 3}},
        413, "too_large", "max_patching_rows",
    ),
}  # fmt: skip


# --- fixtures ----------------------------------------------------------------------------------


class Hostile(NamedTuple):
    server: ServerProcess
    reference: Reference


@pytest.fixture(scope="module")
def hostile(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """The real server (a subprocess, SETTINGS) and Hugging Face's log-probs on REF_TOKENS."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor(REF_TOKENS)).logits.log_softmax(-1)
    del model
    log = tmp_path_factory.mktemp("hostile-server") / "server.log"
    with server_process(gpt2_checkpoint, log, SETTINGS) as server:
        yield Hostile(server, Reference(logprobs))


# --- running a row -----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    content: bytes
    seconds: float
    events: list[tuple[str, str]] | None = None  # SSE: (event, data)
    response: httpx.Response | None = None
    error: str | None = None  # the request itself failed (timeout, closed connection)


def parse_sse(text: str) -> list[tuple[str, str]]:
    events = []
    for block in re.split(r"\r?\n\r?\n", text):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data or name != "message":
            events.append((name, "\n".join(data)))
    return events


def send(server: ServerProcess, row: Row, content: bytes | None) -> Answer:
    """One request on a fresh connection (a 500 closes a keep-alive connection)."""
    headers = row.request_headers(server.port)
    started = time.monotonic()
    deadline = started + row.seconds
    try:
        with (
            httpx.Client(base_url=server.url, timeout=row.seconds) as client,
            client.stream(row.method, row.path, content=content, headers=headers) as response,
        ):
            chunks = []
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the answer took longer than {row.seconds} s")
            body = b"".join(chunks)
    except (httpx.HTTPError, TimeoutError) as exc:
        seconds = time.monotonic() - started
        return Answer(0, httpx.Headers(), b"", seconds, error=f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    events = None
    if response.headers.get("content-type", "").startswith(SSE):
        events = parse_sse(body.decode(errors="replace"))
    plain = httpx.Response(  # read, for the checks
        response.status_code,
        headers=[(k, v) for k, v in response.headers.items() if k != "content-encoding"],
        content=body,
    )
    return Answer(response.status_code, response.headers, body, seconds, events, plain)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def error_problems(row: Row, error: Any, where: str) -> list[str]:
    if not isinstance(error, dict) or not isinstance(error.get("error"), dict):
        return [f"{where}: not an error body: {str(error)[:300]}"]
    body = error["error"]
    problems = []
    codes = _as_tuple(row.code) if row.code else ()
    if codes and body.get("code") not in codes:
        problems.append(f"{where}: code {body.get('code')!r}, expected {' or '.join(codes)}")
    said = f"{body.get('message') or ''}\n{body.get('hint') or ''}"
    if row.says and not re.search(row.says, said, re.IGNORECASE):
        problems.append(f"{where}: /{row.says}/ not in message or hint: {said[:300]!r}")
    return problems


def preview(answer: Answer) -> str:
    media = answer.headers.get("content-type", "")
    if media.startswith((JSON, "text/")):
        return repr(answer.content[:300].decode(errors="replace"))
    return f"{len(answer.content)} bytes of {media or 'no content-type'}"


def answer_problems(row: Row, answer: Answer, reference: Reference) -> list[str]:
    if answer.error:
        return [f"no answer: {answer.error}"]
    statuses = _as_tuple(row.status)
    media = answer.headers.get("content-type", "")
    if answer.events is not None and answer.status == 200:  # an SSE stream
        if not answer.events:
            return ["an empty event stream (a bare close)"]
        last, data = answer.events[-1]
        if last == "done" and 200 in statuses:
            return []
        if last == "error" and row.stream and any(s != 200 for s in statuses):
            try:
                error = json.loads(data)
            except ValueError:
                return [f"the error event's data is not JSON: {data[:200]!r}"]
            return error_problems(row, error, "the stream's error event")
        wanted = "'done'" if statuses == (200,) else "an 'error' event or an error status"
        return [f"the stream ended with {last!r} ({data[:200]!r}), expected {wanted}"]
    if answer.status not in statuses:
        return [f"status {answer.status}, expected {' or '.join(map(str, statuses))}: "
                f"{preview(answer)}"]  # fmt: skip
    if answer.status < 300:
        if row.check and answer.response is not None:
            problem = row.check(answer.response, reference)
            return [problem] if problem else []
        return []
    if not media.startswith(JSON):
        return [f"a {answer.status} with content-type {media!r}, not a JSON error body"]
    try:
        error = json.loads(answer.content)
    except ValueError:
        return [f"a {answer.status} whose body is not JSON: {answer.content[:200]!r}"]
    return error_problems(row, error, f"the {answer.status}")


def settle(server: ServerProcess, within_s: float = 30.0) -> None:
    """Wait until /healthz answers within HEALTHZ_S: a previous row's leftover work (a server
    that has not learnt to stop yet) must not be charged to the next row."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if server.healthz_seconds(timeout_s=HEALTHZ_S) < HEALTHZ_S or not server.alive():
            return
        time.sleep(0.2)


def normal_request_problem(hostile: Hostile) -> str | None:
    """The normal request after a row: Hugging Face's log-probs on REF_TOKENS."""
    try:
        response = httpx.post(
            hostile.server.url + "/v1/forward",
            json={"input": REF_TOKENS},
            headers={"accept": JSON},
            timeout=ROW_SECONDS,
        )
    except httpx.HTTPError as exc:
        return f"the normal request afterwards failed: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"the normal request afterwards got {response.status_code}: {response.text[:300]}"
    gap = logprob_gap(response.json(), hostile.reference)
    if gap >= LOGPROB_TOLERANCE:
        return f"after the row, log_softmax of a normal forward differs from HF by {gap:.3g}"
    return None


def delete_stored(server: ServerProcess, answers: list[Answer]) -> None:
    """Objects a row stored (a 201 with an id) are deleted so later rows start from the same
    store."""
    for answer in answers:
        if answer.status != 201:
            continue
        try:
            object_id = json.loads(answer.content)["id"]
        except (ValueError, KeyError, TypeError):
            continue
        kind = "tensors" if str(object_id).startswith("t_") else "caches"
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{server.url}/v1/{kind}/{object_id}", timeout=ROW_SECONDS)


def run_row(hostile: Hostile, row: Row) -> list[str]:
    server = hostile.server
    notes = []
    restarted = server.ensure_running()
    if restarted:
        notes.append(f"(note: {restarted} before this row)")
    settle(server)
    content = row.content()  # built before the clock starts
    base_rss = server.rss_bytes() or 0
    hwm_reset = server.reset_peak()
    answers: list[Answer] = []
    with HealthPoller(server) as poller:
        for _ in range(row.repeat):
            answers.append(send(server, row, content))
            if not 200 <= answers[-1].status < 300:
                break
    peak = max((server.peak_bytes() or 0) if hwm_reset else 0, poller.max_rss)

    problems: list[str] = []
    last = answers[-1]
    if row.repeat > 1 and len(answers) != MAX_STORED_OBJECTS + 1:  # the store starts empty
        problems.append(
            f"{len(answers) - 1} objects stored before the last answer, expected exactly "
            f"max_stored_objects ({MAX_STORED_OBJECTS})"
        )
    problems += answer_problems(row, last, hostile.reference)
    seconds = sum(answer.seconds for answer in answers)
    if seconds > row.seconds:
        problems.append(f"answered in {seconds:.1f} s, over {row.seconds} s")
    if poller.worst_s >= HEALTHZ_S:
        problems.append(
            f"/healthz took up to {poller.worst_s:.2f} s while the row ran "
            f"({len(poller.latencies)} polls; {'; '.join(poller.failures[:2])})"
        )
    if not server.alive():
        problems.append(f"the server died (exit code {server.proc.returncode})")  # type: ignore[union-attr]
    else:
        growth = peak - base_rss
        if growth > RSS_BOUND:
            problems.append(
                f"RSS grew by {growth / 2**20:.0f} MB (from {base_rss / 2**20:.0f} MB), over "
                f"{RSS_BOUND / 2**20:.0f} MB"
            )
        delete_stored(server, answers)
        settle(server)
        problem = normal_request_problem(hostile)
        if problem:
            problems.append(problem)
    return problems + notes if problems else []


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_request(hostile: Hostile, name: str) -> None:
    problems = run_row(hostile, ROWS[name])
    assert not problems, "\n".join(
        [f"{name}:", *problems, "--- server log (tail):", hostile.server.log_tail(15)]
    )


def test_the_table_covers_enough_requests() -> None:
    assert len(ROWS) >= 40


def test_error_bodies_carry_the_request_id(hostile: Hostile) -> None:
    """Every response has x-request-id; an error body repeats it as error.request_id."""
    with httpx.Client(base_url=hostile.server.url, timeout=ROW_SECONDS) as client:
        ok = client.get("/healthz")
        errors = [
            client.get("/v1/weights/W_nope"),
            client.post("/v1/run_with_hooks", json={"input": REF_TOKENS, "hooks": [SCALE_1] * 65}),
            client.post("/v1/tensors", json={"tensor": {"dtype": "F32", "shape": [1],
                                                        "data": [1.0]}, "ttl_s": "60"}),
        ]  # fmt: skip
    assert ok.headers.get("x-request-id"), ok.headers
    for response in errors:
        request_id = response.headers.get("x-request-id")
        assert request_id, (response.status_code, response.headers)
        assert response.json()["error"].get("request_id") == request_id, response.text


# --- the connection edge: raw sockets ----------------------------------------------------------


@dataclass
class RawOutcome:
    closed_at: float | None = None  # seconds after the start
    data: bytes = b""

    @property
    def status(self) -> int | None:
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.data)
        return int(match.group(1)) if match else None

    def complete_response(self) -> bool:
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        return length is not None and len(body) >= int(length.group(1))

    def error_code(self) -> str | None:
        body = self.data.partition(b"\r\n\r\n")[2]
        try:
            return json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def watch(
    socks: list[socket.socket], started: float, until: float, done: Callable[[RawOutcome], bool]
) -> list[RawOutcome]:
    """Read every socket until the server closes it (or ``done`` says its answer is complete),
    or until ``until``."""
    outcomes = [RawOutcome() for _ in socks]
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
    try:
        while selector.get_map() and time.monotonic() < until:
            for key, _ in selector.select(timeout=max(0.0, min(0.2, until - time.monotonic()))):
                index = key.data
                outcome = outcomes[index]
                try:
                    chunk = socks[index].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    outcome.data += chunk
                if not chunk or done(outcome):
                    outcome.closed_at = time.monotonic() - started
                    selector.unregister(socks[index])
    finally:
        selector.close()
    return outcomes


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


EDGE_CONNECTIONS = 200


def test_half_sent_headers_are_closed(hostile: Hostile) -> None:
    """200 connections send half of their headers: each is closed within header_timeout_s
    (+ slack), and /healthz keeps answering within 1 s meanwhile."""
    server = hostile.server
    server.ensure_running()
    settle(server)
    half = b"POST /v1/forward HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: appl" % server.port
    socks: list[socket.socket] = []
    try:
        with HealthPoller(server) as poller:
            started = time.monotonic()
            for _ in range(EDGE_CONNECTIONS):
                sock = server.raw_socket()
                sock.sendall(half)
                socks.append(sock)
            until = started + HEADER_TIMEOUT_S + SLACK_S
            outcomes = watch(socks, started, until, lambda outcome: False)
    finally:
        close_all(socks)
    still_open = sum(outcome.closed_at is None for outcome in outcomes)
    assert still_open == 0, (
        f"{still_open} of {EDGE_CONNECTIONS} half-sent requests still open after "
        f"{HEADER_TIMEOUT_S + SLACK_S} s (header_timeout_s {HEADER_TIMEOUT_S})"
    )
    server_errors = [o.status for o in outcomes if o.status is not None and o.status >= 500]
    assert not server_errors, f"answered with {server_errors[:5]}"
    assert poller.worst_s < HEALTHZ_S, (poller.worst_s, poller.failures[:3])


def test_half_sent_bodies_get_408(hostile: Hostile) -> None:
    """200 connections send their headers (Content-Length 10000) and half of the body: each gets
    408 request_timeout or is closed within body_timeout_s (+ slack); the body-timeout counter
    grows; /healthz keeps answering within 1 s."""
    server = hostile.server
    server.ensure_running()
    settle(server)
    before = server.metrics().value("hooklab_body_timeouts_total")
    head = (
        b"POST /v1/forward HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000\r\n\r\n" % server.port
    )
    part = b'{"input": [[5, 6, 7]], "pad": "' + b" " * 4968
    socks: list[socket.socket] = []
    try:
        with HealthPoller(server) as poller:
            started = time.monotonic()
            for _ in range(EDGE_CONNECTIONS):
                sock = server.raw_socket()
                sock.sendall(head + part)
                socks.append(sock)
            until = started + BODY_TIMEOUT_S + SLACK_S
            outcomes = watch(socks, started, until, RawOutcome.complete_response)
    finally:
        close_all(socks)
    still_open = sum(outcome.closed_at is None for outcome in outcomes)
    assert still_open == 0, (
        f"{still_open} of {EDGE_CONNECTIONS} half-sent bodies neither answered nor closed after "
        f"{BODY_TIMEOUT_S + SLACK_S} s (body_timeout_s {BODY_TIMEOUT_S})"
    )
    wrong = [
        (o.status, o.error_code())
        for o in outcomes
        if o.status is not None and (o.status != 408 or o.error_code() != "request_timeout")
    ]
    assert not wrong, f"answers other than 408 request_timeout: {wrong[:5]}"
    assert poller.worst_s < HEALTHZ_S, (poller.worst_s, poller.failures[:3])
    after = server.metrics().value("hooklab_body_timeouts_total")
    assert after is not None, "no hooklab_body_timeouts_total in /metrics"
    assert after > (before or 0), f"hooklab_body_timeouts_total stayed at {after}"


def test_a_slow_reader_is_cut_off(hostile: Hostile) -> None:
    """A client asks for 8 MB of frames (a 16 x 128 forward; far more than the loopback socket
    buffers hold) and reads nothing: the server drops the connection within write_timeout_s
    (+ slack, + the forward itself) and counts a write timeout."""
    server = hostile.server
    server.ensure_running()
    settle(server)
    before = server.metrics().value("hooklab_write_timeouts_total")
    body = json.dumps({"input": ids(16, N_CTX)}).encode()
    request = (
        b"POST /v1/forward HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Accept: %s\r\nContent-Length: %d\r\n\r\n" % (server.port, FRAMES.encode(), len(body))
    ) + body
    sock = server.raw_socket(rcvbuf=4096)
    try:
        with HealthPoller(server) as poller:
            started = time.monotonic()
            sock.sendall(request)
            client_port = sock.getsockname()[1]
            seen = closed = None
            until = started + WRITE_TIMEOUT_S + SLACK_S + 2.0
            while time.monotonic() < until:
                held = client_port in server.held_client_ports()
                if held and seen is None:
                    seen = time.monotonic() - started
                if not held and seen is not None:
                    closed = time.monotonic() - started
                    break
                time.sleep(0.1)
    finally:
        sock.close()
    after = server.metrics().value("hooklab_write_timeouts_total")
    assert seen is not None, "the server never held the connection (harness problem)"
    assert closed is not None, (
        f"the server still holds a slow reader's connection after {until - started:.1f} s "
        f"(write_timeout_s {WRITE_TIMEOUT_S}; hooklab_write_timeouts_total {before} -> {after}; "
        "if the timeout fired, a graceful close is still waiting for the unread response to "
        "drain: the connection must be dropped)"
    )
    assert poller.worst_s < HEALTHZ_S, (poller.worst_s, poller.failures[:3])
    assert after is not None, "no hooklab_write_timeouts_total in /metrics"
    assert after > (before or 0), f"hooklab_write_timeouts_total stayed at {after}"


def test_aborted_uploads_are_not_server_errors(hostile: Hostile) -> None:
    """200 uploads stop halfway and close the socket: no 500 in hooklab_requests_total (the
    disconnects are counted as such), no traceback in the server's log, at most one log line
    per disconnect."""
    server = hostile.server
    server.ensure_running()
    settle(server)
    before = server.metrics()
    before_500 = before.value("hooklab_requests_total", status="500") or 0
    before_gone = before.value("hooklab_client_disconnects_total") or 0
    log_offset = server.log_size()
    baseline_sockets = len(server.held_client_ports())
    head = (
        b"POST /v1/run_with_cache HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n" % server.port
    )
    part = b'{"input": [[5, 6, 7]], "names": ["' + b"x" * 3000
    with HealthPoller(server) as poller:
        for _ in range(EDGE_CONNECTIONS):
            sock = server.raw_socket()
            sock.sendall(head + part)
            sock.close()
        until = time.monotonic() + BODY_TIMEOUT_S + SLACK_S
        while time.monotonic() < until and len(server.held_client_ports()) > baseline_sockets:
            time.sleep(0.1)
        time.sleep(0.3)  # the last log lines
    assert server.alive(), server.log_tail()
    assert poller.worst_s < HEALTHZ_S, (poller.worst_s, poller.failures[:3])
    after = server.metrics()
    assert "hooklab_requests_total" in after.text, "no hooklab_requests_total in /metrics"
    after_500 = after.value("hooklab_requests_total", status="500") or 0
    assert after_500 == before_500, f"{after_500 - before_500} aborted uploads counted as 500"
    after_gone = after.value("hooklab_client_disconnects_total")
    assert after_gone is not None, "no hooklab_client_disconnects_total in /metrics"
    assert after_gone > before_gone, f"hooklab_client_disconnects_total stayed at {after_gone}"
    log = server.log_text(log_offset)
    assert "Traceback" not in log, log[-3000:]
    lines = [
        line
        for line in log.splitlines()
        if line.strip() and "/healthz" not in line and "/metrics" not in line
    ]
    assert len(lines) <= EDGE_CONNECTIONS + 10, (
        f"{len(lines)} log lines for {EDGE_CONNECTIONS} aborted uploads:\n" + "\n".join(lines[:10])
    )
