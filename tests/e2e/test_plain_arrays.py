"""Plain nested JSON arrays wherever a tensor goes (steer vectors, patch values, set values,
directions, a residual to start from, stored tensors, token ids), as curl or any language
sends them: float32, or integers for token ids. Each result is compared with TransformerLens
3.9 running the same hook on the same weights; a ragged or non-numeric array is refused naming
the accepted forms."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from .e2e_helpers import FRAMES, assert_close, edit, post, tensors_of, write_selection
from .e2e_servers import Served, sample_tokens

JSON = "application/json"


def _vector(tl: Any, seed: int) -> torch.Tensor:
    return torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(seed))


def _logits(http: httpx.Client, body: dict[str, Any], encoding: str = "json") -> torch.Tensor:
    return tensors_of(post(http, "/v1/run_with_hooks", body, accept=JSON, encoding=encoding))[
        "output.logits"
    ]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_steer_with_a_plain_vector_equals_transformerlens(
    gpt2_server: Served, http: httpx.Client, encoding: str
) -> None:
    tl = gpt2_server.tl
    tokens, vector = sample_tokens(tl), _vector(tl, 1)
    name = "blocks.1.hook_resid_pre"
    spec = {"hook": name, "op": "steer", "vector": vector.tolist(), "coeff": 2.5, "pos": [1, 2]}
    logits = _logits(http, {"input": tokens.tolist(), "hooks": [spec]}, encoding)
    expected = tl.run_with_hooks(
        tokens, fwd_hooks=[(name, edit(lambda x: x + 2.5 * vector, "bpd", {"pos": [1, 2]}))]
    )
    assert_close(logits, expected, "logits")
    assert (logits - tl(tokens)).abs().max() > 1e-3, "the steering changed nothing"


def test_patch_set_and_project_out_with_plain_arrays_equal_transformerlens(
    gpt2_server: Served, http: httpx.Client
) -> None:
    tl = gpt2_server.tl
    tokens = sample_tokens(tl)
    generator = torch.Generator().manual_seed(2)
    patch = torch.randn(2, 1, tl.cfg.d_model, generator=generator)  # [batch, pos 3, d_model]
    value = torch.randn(tl.cfg.d_model, generator=generator)
    direction = _vector(tl, 3)
    unit = direction / direction.norm()
    hooks = [
        {"hook": "blocks.0.hook_resid_post", "op": "patch", "pos": [3],
         "source": {"tensor": patch.tolist()}},
        {"hook": "blocks.1.hook_mlp_out", "op": "set", "pos": [0, 5], "value": [value.tolist()]},
        {"hook": "blocks.1.hook_resid_post", "op": "project_out", "direction": direction.tolist()},
    ]  # fmt: skip
    logits = _logits(http, {"input": tokens.tolist(), "hooks": hooks})
    expected = tl.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.0.hook_resid_post", write_selection(lambda x: patch, "bpd", {"pos": [3]})),
            ("blocks.1.hook_mlp_out", write_selection(lambda x: value, "bpd", {"pos": [0, 5]})),
            ("blocks.1.hook_resid_post", lambda x, hook: x - (x @ unit)[..., None] * unit),
        ],
    )
    assert_close(logits, expected, "logits")


def test_residual_and_token_ids_as_plain_arrays_equal_transformerlens(
    gpt2_server: Served, http: httpx.Client
) -> None:
    """A residual stream [batch, pos, d_model] to start from (floats), and the tokens of its
    loss as a plain 1-D array of ids (integers)."""
    tl = gpt2_server.tl
    tokens = sample_tokens(tl, batch=1)
    _, cache = tl.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    residual = cache["blocks.1.hook_resid_pre"]
    body = {
        "residual": residual.tolist(),
        "start_at_layer": 1,
        "tokens": tokens[0].tolist(),
        "return_type": "both",
    }
    out = tensors_of(post(http, "/v1/forward", body, accept=JSON))
    logits, loss = tl(residual, start_at_layer=1, tokens=tokens, return_type="both")
    assert_close(out["output.logits"], logits, "logits")
    assert_close(out["output.loss"], loss, "loss")


def test_store_a_plain_array_then_steer_by_ref(gpt2_server: Served, http: httpx.Client) -> None:
    tl = gpt2_server.tl
    vector = _vector(tl, 4)
    stored = http.post("/v1/tensors", json={"tensor": vector.tolist()})
    assert stored.status_code == 201, stored.text
    info = stored.json()
    assert (info["dtype"], info["shape"]) == ("F32", [tl.cfg.d_model])
    read = tensors_of(http.get(f"/v1/tensors/{info['id']}", headers={"accept": FRAMES}))
    assert torch.equal(read[info["id"]], vector)  # float32 both ways: exact
    tokens = sample_tokens(tl)
    spec = {"hook": "hook_embed", "op": "steer", "vector": {"ref": info["id"]}}
    expected = tl.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: x + vector)])
    assert_close(_logits(http, {"input": tokens.tolist(), "hooks": [spec]}), expected, "logits")
    assert http.delete(f"/v1/tensors/{info['id']}").status_code == 204


def test_json_tensor_form_still_sets_the_dtype(gpt2_server: Served, http: httpx.Client) -> None:
    """``{"dtype", "shape", "data"}`` keeps working beside plain arrays (here F64 data)."""
    vector = _vector(gpt2_server.tl, 5).double()
    tensor = {"dtype": "F64", "shape": [vector.numel()], "data": vector.tolist()}
    stored = http.post("/v1/tensors", json={"tensor": tensor})
    assert stored.status_code == 201, stored.text
    assert stored.json()["dtype"] == "F64"
    http.delete(f"/v1/tensors/{stored.json()['id']}")


BAD_ARRAYS = {
    "ragged": ([[0.5, 0.5], [0.5]], "ragged"),
    "deeper in one place": ([0.5, [0.5]], "a list where a number is expected"),
    "a string element": (["0.5"], "not a number"),
    "a boolean element": ([True], "not a number"),
    "a string": ("0.5", None),
    "a number": (0.5, None),
}


@pytest.mark.parametrize("value,problem", BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
def test_a_bad_array_names_the_accepted_forms(
    http: httpx.Client, value: Any, problem: str | None
) -> None:
    spec = {"hook": "hook_embed", "op": "steer", "vector": value}
    response = http.post("/v1/run_with_hooks", json={"input": [[5, 6, 7]], "hooks": [spec]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error", error
    message = error["message"]
    assert "hooks.0" in message and "vector" in message, message
    if problem is not None:
        assert problem in message, message
    for form in ("[[0.1, 0.2]]", '{"dtype": "F32", "shape": [2], "data": [0.1, 0.2]}', '{"ref"'):
        assert form in message, message


def test_fractional_token_ids_are_refused(http: httpx.Client) -> None:
    body = {"residual": [[[0.0] * 64] * 3], "start_at_layer": 1, "tokens": [5, 6.5, 7]}
    response = http.post("/v1/forward", json={**body, "return_type": "loss"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "tokens" in error["message"] and "integers" in error["message"], error
