"""Malformed and out-of-limit requests, sent with raw httpx: each gets a 4xx (never a 500) with a
JSON error body whose code is the expected one and whose message (or hint) says what was expected.
After the whole table the server still serves normal requests, and a tensor stored before it is
still there (DESIGN.md §5: bad input never kills the process or loses stored data).

The server is a GPT-2 (2 layers, d_model 64, 4 heads, d_mlp 256, vocab 1000, n_ctx 128) with
``TINY_LIMITS``: 64 tokens, batch 4, 16 KiB bodies, 150 kB responses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import torch

from hooklab_server.api import create_app
from hooklab_server.settings import Settings

from .e2e_servers import TINY_LIMITS, engine_model, serve_app

INTERNAL = "500 internal instead of a 4xx"
TOKENS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]  # batch 2, pos 6
D_MODEL, N_HEADS, D_MLP, VOCAB, N_CTX = 64, 4, 256, 1000, 128


def vec(size: int, dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": [size], "data": [0.5] * size}


def run(*specs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"input": TOKENS, "hooks": list(specs), **fields}


@dataclass
class Bad:
    body: Any  # a dict (sent as JSON, or msgpack with content_type) or raw bytes
    status: int
    code: str | set[str]
    says: list[str]  # regexes, each must match the message or the hint (case-insensitive)
    path: str = "/v1/run_with_hooks"
    method: str = "POST"
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None


def _big_body() -> dict[str, Any]:
    return run(
        {
            "hook": "hook_embed",
            "op": "steer",
            "vector": vec(D_MODEL) | {"data": [0.123456789] * 4000},
        }
    )


def _chunked() -> Iterator[bytes]:
    yield b'{"input": [[1, 2, 3]], "hooks": [], "pad": "'
    for _ in range(40):
        yield b"x" * 1024
    yield b'"}'


CASES: dict[str, Bad] = {
    # --- what a person without the Python client gets told (issue 15)
    "token_id_not_an_integer": Bad(
        {"input": [[5, 1.5]]}, 422, "bad_value",
        [r"input holds token ids, which are integers; got F32 with fractional values"],
        path="/v1/forward",
    ),
    "token_ids_of_a_float_dtype": Bad(
        {"input": {"dtype": "F32", "shape": [1, 2], "data": [5, 6]}}, 422, "bad_dtype",
        [r"token ids, which are integers; got F32\n", r"I64"], path="/v1/forward",
    ),
    "token_ids_neither_text_nor_ids": Bad(
        {"input": [[5, "x"]]}, 422, "validation_error",
        [r"input: expected text .*a list of texts.*token ids"], path="/v1/forward",
    ),
    "spec_without_op": Bad(
        run({"hook": "hook_embed"}), 422, "validation_error",
        [r"hooks\.0: expected a hook spec", r"ablate, patch, steer, scale, clamp, set"],
    ),
    "spec_unknown_op": Bad(
        run({"hook": "hook_embed", "op": "zap"}), 422, "validation_error",
        [r"whose op is one of ablate, patch"],
    ),
    "every_problem_listed": Bad(
        {"input": TOKENS, "return_type": "x", "prepend_bos": "yes", "stop_at_layer": "3",
         "zzz": 1, "padding_side": 3},
        422, "validation_error",
        [r"^5 problems in the request body: ", r"return_type: ", r"prepend_bos: ",
         r"stop_at_layer: ", r"padding_side: ", r"zzz: Extra inputs"],
        path="/v1/forward",
    ),
    "number_as_string": Bad(
        run({"hook": "hook_embed", "op": "scale", "factor": "0.5"}), 422, "validation_error",
        [r"hooks\.0\.scale\.factor: Input should be a valid number"],
    ),
    "unknown_dtype_msgpack": Bad(
        msgpack.packb(
            run({"hook": "hook_embed", "op": "steer", "vector": {
                "kind": "tensor", "dtype": "F99", "shape": [D_MODEL], "data": bytes(4 * D_MODEL)}}),
            use_bin_type=True,
        ),
        422, "bad_dtype", [r"unknown dtype 'F99'", r"F32"], content_type="application/msgpack",
    ),
    "fractional_token_id_tensor": Bad(
        {"input": {"dtype": "I64", "shape": [1, 2], "data": [5, 2.5]}}, 422,
        {"bad_value", "validation_error"}, [r"2\.5"], path="/v1/forward",
    ),
    "outputs_and_return_type": Bad(
        {"input": TOKENS, "outputs": ["loss"], "return_type": "loss"}, 422, "validation_error",
        [r"give 'outputs' or 'return_type', not both"], path="/v1/forward",
    ),
    # --- hook names
    "hook_name_typo": Bad(
        run({"hook": "blocks.0.hook_resid_pots", "op": "ablate"}), 422, "unknown_hook",
        [r"unknown hook point 'blocks\.0\.hook_resid_pots'",
         r"did you mean .*blocks\.0\.hook_resid_post"],
    ),
    "hook_layer_out_of_range": Bad(
        run({"hook": "blocks.7.hook_resid_post", "op": "ablate"}), 422, "unknown_hook",
        [r"blocks\.7\.hook_resid_post", r"this model has 2 layers: blocks\.0 … blocks\.1"],
    ),
    "glob_matches_nothing": Bad(
        run({"hook": "blocks.*.hook_nothing", "op": "scale", "factor": 2}), 422, "unknown_hook",
        [r"matches no hook point", r"blocks\.\*\.hook_resid_post"],
    ),
    "cache_name_unknown": Bad(
        {"input": TOKENS, "names": ["blocks.0.attn.hook_patern"]}, 422, "unknown_hook",
        [r"blocks\.0\.attn\.hook_pattern"], path="/v1/run_with_cache",
    ),
    "hook_name_too_long": Bad(
        run({"hook": "x" * 300, "op": "ablate"}), 422, "validation_error", [r"hook", r"256"]
    ),
    # --- selectors
    "pos_out_of_range": Bad(
        run({"hook": "blocks.0.hook_resid_post", "op": "ablate", "pos": [6]}), 422, "bad_index",
        [r"pos index 6 is out of range", r"size 6", r"-6\.\.5"],
    ),
    "head_out_of_range": Bad(
        run({"hook": "blocks.1.attn.hook_z", "op": "ablate", "head": 4}), 422, "bad_index",
        [r"head index 4", r"size 4"],
    ),
    "head_out_of_range_pattern": Bad(
        run({"hook": "blocks.1.attn.hook_pattern", "op": "scale", "factor": 0, "head": [-5]}),
        422, "bad_index", [r"head index -5", r"size 4"],
    ),
    "batch_out_of_range": Bad(
        run({"hook": "hook_embed", "op": "ablate", "batch": [0, 2]}), 422, "bad_index",
        [r"batch index 2", r"size 2"],
    ),
    "neuron_out_of_range": Bad(
        run({"hook": "blocks.0.mlp.hook_post", "op": "ablate", "neuron": [D_MLP]}), 422,
        "bad_index", [r"neuron index 256", r"size 256"],
    ),
    "selector_on_missing_axis": Bad(
        run({"hook": "blocks.0.hook_resid_post", "op": "ablate", "head": [0]}), 422, "bad_index",
        [r"has no head axis", r"batch.*pos.*d_model"],
    ),
    "empty_selector": Bad(
        run({"hook": "blocks.0.hook_resid_post", "op": "ablate", "pos": []}), 422, "bad_index",
        [r"pos selector .* is empty"],
    ),
    "selector_not_an_int": Bad(
        run({"hook": "blocks.0.hook_resid_post", "op": "ablate", "pos": "first"}), 422,
        "validation_error", [r"pos", r"int"],
    ),
    "resample_rows_wrong_length": Bad(
        run({"hook": "hook_embed", "op": "ablate", "mode": "resample", "source_batch": [1]}),
        422, "bad_index", [r"source_batch must list 2 rows"],
    ),
    "patch_row_out_of_range": Bad(
        run({"hook": "hook_embed", "op": "patch", "source": {"batch": 3}}), 422, "bad_index",
        [r"source batch 3 is out of range", r"batch size 2"],
    ),
    # --- tensors in specs
    "steer_vector_wrong_shape": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer", "vector": vec(63)}), 422,
        "bad_shape", [r"steering vector .* shape \[63\]", r"expected \[64\]"],
    ),
    "patch_tensor_wrong_shape": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "patch", "pos": [1],
             "source": {"tensor": {"dtype": "F32", "shape": [2, 2, D_MODEL],
                                   "data": [0.0] * (4 * D_MODEL)}}}),
        422, "bad_shape", [r"patch tensor .* shape \[2, 2, 64\]", r"\[2, 6, 64\]", r"\[2, 1, 64\]"],
    ),
    "set_tensor_not_broadcastable": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "set", "value": vec(5)}), 422,
        "bad_shape", [r"does not broadcast", r"\[2, 6, 64\]"],
    ),
    "set_tensor_more_dims_than_selection": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "set",
             "value": {"dtype": "F32", "shape": [1, 1, 1, D_MODEL], "data": [0.0] * D_MODEL}}),
        422, "bad_shape", [r"\[1, 1, 1, 64\]", r"\[2, 6, 64\]"],
    ),
    "project_out_zero_direction": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "project_out",
             "direction": {"dtype": "F32", "shape": [D_MODEL], "data": [0.0] * D_MODEL}}),
        422, "validation_error", [r"non-zero"],
    ),
    "unknown_dtype": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer", "vector": vec(D_MODEL, "F33")}),
        422, {"bad_dtype", "validation_error"}, [r"unknown dtype 'F33'", r"F32"],
    ),
    "data_count_mismatch": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer",
             "vector": {"dtype": "F32", "shape": [D_MODEL], "data": [1.0] * 63}}),
        422, "bad_shape", [r"shape \[64\]", r"64 elements"],
    ),
    "nested_data_wrong_shape": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer",
             "vector": {"dtype": "F32", "shape": [2, 32], "data": [[1.0] * 32, [1.0] * 31]}}),
        422, "bad_shape", [r"does not match shape \[2, 32\]"],
    ),
    "negative_shape": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer",
             "vector": {"dtype": "F32", "shape": [-64], "data": []}}),
        422, "validation_error", [r"shape", r"greater than or equal to 0"],
    ),
    "string_in_float_data": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer",
             "vector": {"dtype": "F32", "shape": [2], "data": [1.0, "one"]}}),
        422, "bad_value", [r"'one' is not a valid F32"],
    ),
    "unknown_tensor_ref": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "steer", "vector": {"ref": "t_nope"}}),
        404, "not_found", [r"no stored tensor 't_nope'"],
    ),
    "unknown_cache_ref": Bad(
        run({"hook": "blocks.0.hook_resid_pre", "op": "patch", "source": {"cache": "c_nope"}}),
        404, "not_found", [r"no stored cache 'c_nope'"],
    ),
    # --- inputs
    "token_out_of_vocab": Bad(
        {"input": [[1, 2, VOCAB]]}, 422, "bad_index",
        [r"token id 1000 is outside the vocabulary \(0\.\.999\)"], path="/v1/forward",
    ),
    "negative_token": Bad(
        {"input": [[1, -2, 3]]}, 422, "bad_index", [r"token id -2"], path="/v1/forward"
    ),
    "huge_token_id": Bad(
        {"input": [[1, 2**70]]}, 422, {"bad_index", "validation_error", "bad_shape"},
        [r"token|input"], path="/v1/forward",
    ),
    "huge_id_in_json_i64_tensor": Bad(
        {"input": {"dtype": "I64", "shape": [1, 2], "data": [1, 2**70]}}, 422,
        {"bad_value", "validation_error"}, [r"I64"], path="/v1/forward",
    ),
    "huge_attention_mask_value": Bad(
        {"input": TOKENS, "attention_mask": [[2**70] * 6] * 2}, 422,
        {"bad_shape", "validation_error"}, [r"0/1|int64"],
        path="/v1/forward",
    ),
    "deeply_nested_input": Bad(
        b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
        {"validation_error", "bad_request", "bad_shape"}, [r"input|nest|deep"],
        path="/v1/forward",
    ),
    "loss_tokens_shape_mismatch": Bad(
        {"residual": {"dtype": "F32", "shape": [1, 2, D_MODEL], "data": [0.0] * 128},
         "start_at_layer": 1, "tokens": [[1, 2, 3]], "return_type": "loss"},
        422, "bad_shape", [r"tokens", r"\[1, 2\]"], path="/v1/forward",
    ),
    "cache_names_glob": Bad(
        {"input": TOKENS, "names": ["blocks.*.hook_nope"]}, 422, "unknown_hook",
        [r"matches no hook point"], path="/v1/run_with_cache",
    ),
    "float8_steer_vector": Bad(
        run({"hook": "hook_embed", "op": "steer", "vector": vec(D_MODEL, "F8_E4M3")}), 200,
        "", [],
    ),
    "non_rectangular_tokens": Bad(
        {"input": [[1, 2, 3], [4, 5]]}, 422, "bad_shape", [r"rectangle"], path="/v1/forward"
    ),
    "empty_input": Bad({"input": []}, 422, "bad_shape", [r"non-empty"], path="/v1/forward"),
    "float_token_tensor": Bad(
        {"input": {"dtype": "F32", "shape": [1, 2], "data": [[1.0, 2.0]]}}, 422, "bad_dtype",
        [r"integers"], path="/v1/forward",
    ),
    "missing_input": Bad({}, 422, "validation_error", [r"'input'"], path="/v1/forward"),
    "attention_mask_wrong_shape": Bad(
        {"input": TOKENS, "attention_mask": [[1, 1, 1]]}, 422, "bad_shape",
        [r"attention_mask must be 0/1 of shape \[2, 6\]"], path="/v1/forward",
    ),
    "attention_mask_not_binary": Bad(
        {"input": TOKENS, "attention_mask": [[1, 1, 1, 1, 1, 2]] * 2}, 422, "bad_shape",
        [r"0/1"], path="/v1/forward",
    ),
    "remove_batch_dim_with_batch_2": Bad(
        {"input": TOKENS, "names": ["hook_embed"], "remove_batch_dim": True}, 422,
        "validation_error", [r"remove_batch_dim needs a batch of 1, got 2"],
        path="/v1/run_with_cache",
    ),
    "start_at_layer_without_residual": Bad(
        {"input": TOKENS, "start_at_layer": 1}, 422, "validation_error",
        [r"start_at_layer needs 'residual'"], path="/v1/forward",
    ),
    "residual_wrong_width": Bad(
        {"residual": {"dtype": "F32", "shape": [1, 2, 3], "data": [0.0] * 6}, "start_at_layer": 1},
        422, "bad_shape", [r"residual must be floats \[batch, pos, 64\]"], path="/v1/forward",
    ),
    "loss_from_residual_without_tokens": Bad(
        {"residual": {"dtype": "F32", "shape": [1, 2, D_MODEL], "data": [0.0] * 128},
         "start_at_layer": 1, "return_type": "loss"},
        422, "validation_error", [r"loss needs token ids"], path="/v1/forward",
    ),
    "stop_at_layer_out_of_range": Bad(
        {"input": TOKENS, "stop_at_layer": 5}, 422, "validation_error",
        [r"stop_at_layer=5 is outside -2\.\.2"], path="/v1/forward",
    ),
    "bad_return_type": Bad(
        {"input": TOKENS, "return_type": "logprobs"}, 422, "validation_error",
        [r"return_type", r"logits"], path="/v1/forward",
    ),
    # --- spec vocabulary
    "unknown_op": Bad(
        run({"hook": "hook_embed", "op": "explode"}), 422, "validation_error",
        [r"explode", r"ablate", r"project_out"],
    ),
    "unknown_ablate_mode": Bad(
        run({"hook": "hook_embed", "op": "ablate", "mode": "noise"}), 422, "validation_error",
        [r"mode", r"zero"],
    ),
    "extra_field_in_spec": Bad(
        run({"hook": "hook_embed", "op": "steer", "vector": vec(D_MODEL), "coef": 2}), 422,
        "validation_error", [r"coef", r"[Ee]xtra"],
    ),
    "extra_top_level_field": Bad(
        {"input": TOKENS, "fwd_hooks": []}, 422, "validation_error", [r"fwd_hooks", r"[Ee]xtra"],
        path="/v1/forward",
    ),
    "clamp_without_bounds": Bad(
        run({"hook": "hook_embed", "op": "clamp"}), 422, "validation_error",
        [r"clamp needs 'min', 'max' or both"],
    ),
    "clamp_min_above_max": Bad(
        run({"hook": "hook_embed", "op": "clamp", "min": 2, "max": 1}), 422, "validation_error",
        [r"min 2(\.0)? is above max 1"],
    ),
    "scale_without_factor": Bad(
        run({"hook": "hook_embed", "op": "scale"}), 422, "validation_error", [r"factor"]
    ),
    "conflicting_specs": Bad(
        run({"hook": "blocks.0.hook_resid_post", "op": "ablate", "pos": [1, 2]},
            {"hook": "blocks.*.hook_resid_post", "op": "set", "value": 1.0, "pos": [2]}),
        422, "conflicting_specs", [r"hook specs 0 and 1 both replace", r"disjoint"],
    ),
    # --- limits
    "batch_over_limit": Bad(
        {"input": [[1, 2]] * 5}, 413, "too_large",
        [r"5 prompts exceed the limit of 4", r"max_batch"], path="/v1/forward",
    ),
    "tokens_over_limit": Bad(
        {"input": [list(range(1, 41))] * 2}, 413, "too_large",
        [r"80 tokens exceed the limit of 64", r"max_tokens"], path="/v1/forward",
    ),
    "positions_over_context": Bad(
        {"input": [list(range(1, 131))]}, 413, "too_large",
        [r"130 tokens exceed the limit of 64"], path="/v1/forward",
    ),
    "response_over_limit": Bad(
        {"input": [list(range(1, 31))] * 2, "names": None}, 413, "too_large",
        [r"\d+ bytes of response \(estimated\) exceed the limit of 150000", r"fewer hook points"],
        path="/v1/run_with_cache", headers={"accept": "application/vnd.hooklab.frames+msgpack"},
    ),
    "body_over_limit": Bad(
        _big_body(), 413, "too_large", [r"bytes of request body exceed the limit of 16384"],
    ),
    "chunked_body_over_limit": Bad(
        _chunked, 413, "too_large", [r"bytes of request body exceed the limit of 16384"],
        path="/v1/forward",
    ),
    # --- encodings
    "garbage_json": Bad(b'{"input": [[1, 2', 400, "bad_request", [r"not valid application/json"]),
    "json_not_an_object": Bad(b"[1, 2, 3]", 422, "validation_error", [r"object|dict|valid"]),
    "truncated_msgpack": Bad(
        msgpack.packb(run({"hook": "hook_embed", "op": "scale", "factor": 2}))[:-7], 400,
        "bad_request", [r"not valid application/msgpack"], content_type="application/msgpack",
    ),
    "msgpack_tensor_bad_version": Bad(
        msgpack.packb(run({"hook": "hook_embed", "op": "steer", "vector": {
            "kind": "tensor", "v": 2, "name": "", "dtype": "F32", "shape": [D_MODEL],
            "pad": b"", "data": bytes(4 * D_MODEL)}}), use_bin_type=True),
        422, "bad_shape", [r"version 2 is not supported"], content_type="application/msgpack",
    ),
    "msgpack_tensor_byte_count": Bad(
        msgpack.packb(run({"hook": "hook_embed", "op": "steer", "vector": {
            "kind": "tensor", "v": 1, "name": "", "dtype": "F32", "shape": [D_MODEL],
            "pad": b"", "data": bytes(4 * D_MODEL - 2)}}), use_bin_type=True),
        422, "bad_shape", [r"needs 256 bytes, got 254"], content_type="application/msgpack",
    ),
    "wrong_content_type": Bad(
        b"input=1", 415, "unsupported_media_type", [r"text/plain", r"application/json"],
        content_type="text/plain",
    ),
    "no_content_type": Bad(
        b'{"input": [[1]]}', 415, "unsupported_media_type", [r"application/msgpack"],
        content_type=None,
    ),
    # --- other endpoints
    "unknown_weight": Bad(None, 404, "not_found", [r"no weight named 'W_nope'", r"W_Q"],
                          path="/v1/weights/W_nope", method="GET"),
    "unknown_stored_tensor": Bad(None, 404, "not_found", [r"t_missing"],
                                 path="/v1/tensors/t_missing", method="GET"),
    "delete_unknown_cache": Bad(None, 404, "not_found", [r"c_missing"],
                                path="/v1/caches/c_missing", method="DELETE"),
    "unknown_route": Bad(
        None, 404, "not_found", [r"/v1/nope"], path="/v1/nope", method="GET",
    ),
    "wrong_method": Bad(
        None, 405, "method_not_allowed", [r"DELETE /v1/model", r"/docs"], path="/v1/model",
        method="DELETE",
    ),
    "store_negative_ttl": Bad(
        {"tensor": vec(4), "ttl_s": -1}, 422, "validation_error", [r"ttl_s", r"greater than 0"],
        path="/v1/tensors",
    ),
    "detokenize_negative_id": Bad(
        {"tokens": [1, -1]}, 422, {"bad_index", "validation_error"}, [r"-1"],
        path="/v1/detokenize",
    ),
    "detokenize_ragged": Bad(
        {"tokens": [[1, 2], [3]]}, 422, {"bad_shape", "validation_error"},
        [r"rectangle|ragged|length"],
        path="/v1/detokenize",
    ),
    "tokenize_empty_list": Bad(
        {"input": []}, 422, "validation_error", [r"input"], path="/v1/tokenize",
    ),
    "tokenize_wrong_type": Bad(
        {"input": 12}, 422, "validation_error", [r"input"], path="/v1/tokenize"
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_server(serve_in: Any, gpt2_checkpoint: Any) -> Iterator[dict[str, Any]]:
    """A server with TINY_LIMITS and one tensor stored before any bad request (in each
    deployment)."""
    with (
        serve_in(gpt2_checkpoint, TINY_LIMITS) as served,
        httpx.Client(base_url=served.url, timeout=60) as client,
    ):
        stored = client.post("/v1/tensors", json={"tensor": vec(8)})
        assert stored.status_code == 201, stored.text
        yield {"client": client, "stored": stored.json()["id"], "served": served}


def _send(url: str, case: Bad) -> httpx.Response:
    """One case on a fresh connection (a 500 makes uvicorn drop the keep-alive connection)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        return _send_on(client, case)


def _send_on(client: httpx.Client, case: Bad) -> httpx.Response:
    headers = dict(case.headers)
    if case.content_type:
        headers["content-type"] = case.content_type
    if case.body is None:
        return client.request(case.method, case.path, headers=headers)
    if callable(case.body):
        content: Any = case.body()
    elif isinstance(case.body, bytes):
        content = case.body
    else:
        import json

        content = json.dumps(case.body).encode()
    return client.request(case.method, case.path, content=content, headers=headers)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case.xfail))
        if case.xfail
        else name
        for name, case in CASES.items()
    ],
)
def test_bad_request(bad_server: dict[str, Any], name: str) -> None:
    case = CASES[name]
    response = _send(bad_server["served"].url, case)
    if case.status == 200:  # a valid request that must simply work
        assert response.status_code == 200, response.text
        return
    assert response.status_code != 500, f"500 for {name}: {response.text}"
    assert response.status_code == case.status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "hint", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    codes = case.code if isinstance(case.code, set) else {case.code}
    assert error["code"] in codes, error
    said = f"{error['message']}\n{error['hint'] or ''}"
    for pattern in case.says:
        assert re.search(pattern, said, re.IGNORECASE), f"{pattern!r} not in {said!r}"


def test_the_server_survives_the_table(bad_server: dict[str, Any]) -> None:
    """Runs after the table (file order): normal requests work and stored data is intact."""
    client = bad_server["client"]
    response = client.post(
        "/v1/run_with_cache",
        json={"input": TOKENS, "names": ["blocks.0.hook_resid_post"]},
        headers={"accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    tensors = response.json()["tensors"]
    served = bad_server["served"]
    expected_logits = served.tl(torch.tensor(TOKENS))
    logits = torch.tensor(tensors["output.logits"]["data"])
    assert (logits - expected_logits).abs().max() < 1e-4
    stored = client.get(
        f"/v1/tensors/{bad_server['stored']}", headers={"accept": "application/json"}
    )
    assert stored.status_code == 200, stored.text
    assert stored.json()["tensors"][bad_server["stored"]]["data"] == [0.5] * 8
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_unexpected_server_error_is_a_500_envelope_and_the_connection_survives(
    gpt2_checkpoint: Path,
) -> None:
    """Fault injection: the work behind /v1/forward raises an unexpected exception on the
    executor thread. The
    client gets the JSON error envelope (code internal) and the same keep-alive connection
    serves the next request."""
    app = create_app(engine_model(gpt2_checkpoint), Settings())
    operations = app.state.hooklab.models.entry.operations

    def broken(work: object, token: object) -> Iterator[object]:
        raise RuntimeError("injected fault")
        yield  # a steps generator whose first unit fails on the executor thread

    with serve_app(app) as running, httpx.Client(base_url=running.url) as client:
        original, operations.steps = operations.steps, broken
        try:
            response = client.post("/v1/forward", json={"input": [[1, 2, 3]]})
        finally:
            operations.steps = original
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal"
        assert "RuntimeError" in response.json()["error"]["message"]
        again = client.get("/healthz")  # same pooled connection
        assert again.status_code == 200
        assert client.post("/v1/forward", json={"input": [[1, 2, 3]]}).status_code == 200
