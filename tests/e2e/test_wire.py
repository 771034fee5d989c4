"""The HTTP contract as another language sees it: raw httpx, JSON and msgpack bodies, frame streams
read by an independent parser written from the spec (DESIGN.md §4), and /openapi.json."""

from __future__ import annotations

from typing import Any

import httpx
import msgpack
import pytest
import torch

from .e2e_helpers import (
    FRAMES,
    assert_close,
    edit,
    json_tensor,
    msgpack_tensor,
    parse_frames,
    post,
    tensors_of,
)
from .e2e_servers import Served, sample_tokens

# ---- JSON and frames carry the same values ---------------------------------------------------

NAMES = [
    "hook_embed",
    "blocks.0.attn.hook_pattern",
    "blocks.1.attn.hook_attn_scores",
    "blocks.1.hook_resid_post",
]


@pytest.mark.parametrize("path", ["/v1/run_with_cache", "/v1/run_with_hooks"])
def test_json_and_frame_responses_carry_the_same_values(
    gpt2_server: Served, http: httpx.Client, path: str
) -> None:
    tokens = sample_tokens(gpt2_server.tl)
    body = {"input": tokens.tolist(), "names": NAMES}
    as_json = tensors_of(post(http, path, body, accept="application/json"))
    as_frames = tensors_of(post(http, path, body, accept=FRAMES))
    assert set(as_json) == set(as_frames) == {"output.logits", *NAMES}
    for name, value in as_frames.items():
        # JSON floats are float32 values printed as doubles: exact, infinities included
        assert torch.equal(as_json[name].to(value.dtype), value), name
    ref_logits, ref_cache = gpt2_server.tl.run_with_cache(tokens, names_filter=NAMES)
    assert_close(as_frames["output.logits"], ref_logits, "logits")
    for name in NAMES:
        assert_close(as_frames[name], ref_cache[name], name)


def test_json_unless_frames_are_asked_for(http: httpx.Client) -> None:
    for accept, media in (
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        (FRAMES, FRAMES),
        (f"{FRAMES}, application/json", FRAMES),
    ):
        headers = {"accept": accept} if accept else {}
        response = http.post("/v1/forward", json={"input": [[5, 6, 7]]}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(media), accept


@pytest.mark.parametrize("accept", ["application/json", FRAMES])
def test_content_length_equals_bytes_received(http: httpx.Client, accept: str) -> None:
    body = {"input": [[5, 6, 7, 8]], "names": ["blocks.0.hook_resid_pre"]}
    for path in ("/v1/forward", "/v1/run_with_cache"):
        sent = body if path.endswith("run_with_cache") else {"input": body["input"]}
        with http.stream("POST", path, json=sent, headers={"accept": accept}) as r:
            assert r.status_code == 200
            received = b"".join(r.iter_raw())
        if path.endswith("run_with_cache") and accept == FRAMES:
            # Sent while the forward runs: the length is not known when the response starts.
            assert "content-length" not in r.headers
            assert r.headers["transfer-encoding"] == "chunked"
            assert parse_frames(received)[2]["kind"] == "end"
        else:
            assert int(r.headers["content-length"]) == len(received)
    response = http.get("/v1/weights/W_E", headers={"accept": accept})
    assert int(response.headers["content-length"]) == len(response.content)


def test_weights_json_and_frames(gpt2_server: Served, http: httpx.Client) -> None:
    for name in ("W_E", "blocks.1.attn.W_Q", "b_U"):
        as_json = tensors_of(
            http.get(f"/v1/weights/{name}", headers={"accept": "application/json"})
        )
        as_frames = tensors_of(http.get(f"/v1/weights/{name}", headers={"accept": FRAMES}))
        assert torch.equal(as_json[name], as_frames[name]), name
    assert_close(as_frames["b_U"], gpt2_server.tl.b_U, "b_U")
    ref_wq = gpt2_server.tl.blocks[1].attn.W_Q
    w_q = tensors_of(http.get("/v1/weights/blocks.1.attn.W_Q"))["blocks.1.attn.W_Q"]
    assert_close(w_q, ref_wq, "blocks.1.attn.W_Q")


# ---- curl-style requests ---------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_curl_steer_with_json_tensor(gpt2_server: Served, http: httpx.Client, flat: bool) -> None:
    tl = gpt2_server.tl
    tokens = sample_tokens(tl)
    vector = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(1))
    name = "blocks.1.hook_resid_pre"
    body = {
        "input": tokens.tolist(),
        "hooks": [
            {
                "hook": name,
                "op": "steer",
                "vector": json_tensor(vector, flat),
                "coeff": 2.5,
                "pos": [1, 2],
            }
        ],
    }
    logits = tensors_of(post(http, "/v1/run_with_hooks", body, accept="application/json"))
    expected = tl.run_with_hooks(
        tokens, fwd_hooks=[(name, edit(lambda x: x + 2.5 * vector, "bpd", {"pos": [1, 2]}))]
    )
    assert_close(logits["output.logits"], expected, "logits")


def test_curl_text_input_loss_and_ablation(gpt2_server: Served, http: httpx.Client) -> None:
    text = "import os\nprint(os.getcwd())"
    body = {
        "input": text,
        "return_type": "both",
        "hooks": [{"hook": "blocks.0.attn.hook_z", "op": "ablate", "mode": "zero", "head": [1]}],
    }
    out = tensors_of(post(http, "/v1/forward", body, accept="application/json"))
    logits, loss = gpt2_server.tl.run_with_hooks(
        text,
        return_type="both",
        fwd_hooks=[("blocks.0.attn.hook_z", edit(torch.zeros_like, "bphd", {"head": [1]}))],
    )
    assert_close(out["output.logits"], logits, "logits")
    assert_close(out["output.loss"], loss, "loss")


def test_outputs_lists_what_comes_back(gpt2_server: Served, http: httpx.Client) -> None:
    tokens = sample_tokens(gpt2_server.tl)
    logits, loss = gpt2_server.tl(tokens, return_type="both")
    for outputs, expected in (
        ([], {}),
        (["loss"], {"output.loss": loss}),
        (["logits"], {"output.logits": logits}),
        (["loss", "logits"], {"output.loss": loss, "output.logits": logits}),
    ):
        body = {"input": tokens.tolist(), "outputs": outputs}
        out = tensors_of(post(http, "/v1/forward", body, accept="application/json"))
        assert set(out) == set(expected), outputs
        for name, reference in expected.items():
            assert_close(out[name], reference, name)
    cached = tensors_of(
        post(http, "/v1/run_with_cache", {"input": tokens.tolist(), "names": ["hook_embed"],
             "outputs": []}, accept="application/json")
    )  # fmt: skip
    assert set(cached) == {"hook_embed"}


def test_curl_tokenize_and_detokenize(gpt2_server: Served, http: httpx.Client) -> None:
    tl = gpt2_server.tl
    texts = ["a = 1", "def g(): pass"]
    response = http.post("/v1/tokenize", json={"input": texts, "padding_side": "left"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == tl.to_tokens(texts, padding_side="left").tolist()
    assert body["str_tokens"][0] == tl.to_str_tokens(torch.tensor(body["tokens"][0]))
    mask = body["attention_mask"]
    assert [sum(row) for row in mask] == [len(tl.to_tokens(t)[0]) for t in texts]
    tokens = tl.to_tokens("def g(): pass")[0].tolist()
    response = http.post("/v1/detokenize", json={"tokens": tokens})
    assert response.json() == {"text": tl.to_string(torch.tensor(tokens))}


def test_model_info_json(gpt2_server: Served, http: httpx.Client) -> None:
    info = http.get("/v1/model").json()
    tl = gpt2_server.tl
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
        assert info["cfg"][field] == getattr(tl.cfg, field), field
    names = {point["name"] for point in info["hook_points"]}
    assert names == set(tl.hook_dict)
    shapes = {point["name"]: point["shape"] for point in info["hook_points"]}
    assert shapes["blocks.0.attn.hook_pattern"] == ["batch", "head", "pos", "key_pos"]
    assert shapes["blocks.0.hook_resid_post"] == ["batch", "pos", "d_model"]


# ---- msgpack request bodies ------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["application/json", FRAMES])
def test_msgpack_request_with_tensor_maps(
    gpt2_server: Served, http: httpx.Client, accept: str
) -> None:
    tl = gpt2_server.tl
    tokens = sample_tokens(tl)
    name = "blocks.0.hook_resid_post"
    patch = torch.randn(2, 1, tl.cfg.d_model, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(3))
    body = {
        "input": msgpack_tensor(tokens),
        "names": [name],
        "hooks": [
            {"hook": name, "op": "patch", "source": {"tensor": msgpack_tensor(patch)}, "pos": [3]},
            {
                "hook": "blocks.1.hook_resid_pre",
                "op": "project_out",
                "direction": msgpack_tensor(direction),
            },
        ],
    }
    out = tensors_of(post(http, "/v1/run_with_hooks", body, accept=accept, encoding="msgpack"))

    def set_pos_3(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[:, 3:4] = patch
        return x

    unit = direction / direction.norm()
    ref_hooks = [
        (name, set_pos_3),
        ("blocks.1.hook_resid_pre", edit(lambda x: x - (x @ unit)[..., None] * unit, "bpd", {})),
    ]
    with tl.hooks(fwd_hooks=ref_hooks):
        logits, cache = tl.run_with_cache(tokens, names_filter=[name])
    assert_close(out["output.logits"], logits, "logits")
    assert_close(out[name], cache[name], name)


@pytest.mark.parametrize(
    "content_type", ["application/msgpack", "application/x-msgpack", "application/vnd.msgpack"]
)
def test_msgpack_content_type_aliases(http: httpx.Client, content_type: str) -> None:
    response = http.post(
        "/v1/forward",
        content=msgpack.packb({"input": [[1, 2, 3]]}),
        headers={"content-type": content_type, "accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["tensors"]["output.logits"]["shape"][:2] == [1, 3]


def test_json_content_type_with_charset(http: httpx.Client) -> None:
    response = http.post(
        "/v1/forward",
        content=b'{"input": [[1, 2, 3]]}',
        headers={"content-type": "application/json; charset=utf-8", "accept": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_store_with_json_tensor_then_use_ref(gpt2_server: Served, http: httpx.Client) -> None:
    tl = gpt2_server.tl
    vector = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(4))
    stored = http.post("/v1/tensors", json={"tensor": json_tensor(vector)})
    assert stored.status_code == 201, stored.text
    info = stored.json()
    assert info["kind"] == "tensor" and info["shape"] == [tl.cfg.d_model]
    assert info["nbytes"] == 4 * tl.cfg.d_model
    tokens = sample_tokens(tl)
    body = {
        "input": tokens.tolist(),
        "hooks": [{"hook": "hook_embed", "op": "steer", "vector": {"ref": info["id"]}}],
    }
    out = tensors_of(post(http, "/v1/run_with_hooks", body, accept=FRAMES))
    expected = tl.run_with_hooks(
        tokens, fwd_hooks=[("hook_embed", edit(lambda x: x + vector, "bpd", {}))]
    )
    assert_close(out["output.logits"], expected, "logits")
    assert http.delete(f"/v1/tensors/{info['id']}").status_code == 204


# ---- OpenAPI ---------------------------------------------------------------------------------

ENDPOINTS = {
    "/v1/model": {"get"},
    "/v1/forward": {"post"},
    "/v1/run_with_cache": {"post"},
    "/v1/run_with_hooks": {"post"},
    "/v1/tokenize": {"post"},
    "/v1/detokenize": {"post"},
    "/v1/weights/{name}": {"get"},
    "/v1/tensors": {"post"},
    "/v1/tensors/{object_id}": {"get", "delete"},
    "/v1/caches/{object_id}": {"get", "delete"},
}
REQUEST_SCHEMAS = {
    "/v1/forward": "ForwardRequest",
    "/v1/run_with_cache": "RunWithCacheRequest",
    "/v1/run_with_hooks": "RunWithHooksRequest",
    "/v1/tokenize": "TokenizeRequest",
    "/v1/detokenize": "DetokenizeRequest",
    "/v1/tensors": "StoreTensorRequest",
}
DECLARATIVE_OPS = {"ablate", "patch", "steer", "scale", "clamp", "set", "project_out"}
# Sparse autoencoder features at the hook point an SAE reads (batch and pos selectors).
FEATURE_OPS = {"feature_steer", "feature_ablate", "feature_clamp"}
# Python hook functions: traced into a graph, or called back on the client.
OPS = DECLARATIVE_OPS | FEATURE_OPS | {"graph", "callback"}


@pytest.fixture(scope="module")
def openapi(gpt2_server: Served) -> dict[str, Any]:
    response = httpx.get(f"{gpt2_server.url}/openapi.json")
    assert response.status_code == 200
    return response.json()


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_openapi_lists_every_endpoint(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    for path, methods in ENDPOINTS.items():
        assert path in paths, f"{path} missing from /openapi.json"
        assert methods <= set(paths[path]), (path, set(paths[path]))
    for path, schema in REQUEST_SCHEMAS.items():
        body = paths[path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(f"/{schema}"), (path, ref)
    for path in ("/v1/forward", "/v1/run_with_cache", "/v1/run_with_hooks"):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert {FRAMES, "application/json"} <= set(content), path
        errors = paths[path]["post"]["responses"]
        assert {"413", "422"} <= set(errors), path


def test_openapi_hook_spec_union(openapi: dict[str, Any]) -> None:
    for request in ("ForwardRequest", "RunWithCacheRequest", "RunWithHooksRequest"):
        hooks_schema = openapi["components"]["schemas"][request]["properties"]["hooks"]["items"]
        assert hooks_schema["discriminator"]["propertyName"] == "op"
        mapping = hooks_schema["discriminator"]["mapping"]
        assert set(mapping) == OPS
        variants = [_resolve(openapi, item) for item in hooks_schema["oneOf"]]
        assert {v["properties"]["op"]["const"] for v in variants} == OPS
        for variant in variants:
            assert "hook" in variant["required"], variant["title"]
            if variant["properties"]["op"]["const"] in FEATURE_OPS:
                assert {"feature", "batch", "pos"} <= set(variant["properties"]), variant["title"]
                assert "feature" in variant["required"], variant["title"]
            if variant["properties"]["op"]["const"] not in DECLARATIVE_OPS:
                continue
            for selector in ("batch", "pos", "head", "neuron"):
                assert selector in variant["properties"], (variant["title"], selector)
            assert variant.get("additionalProperties") is False, variant["title"]
    schemas = openapi["components"]["schemas"]
    assert set(schemas["AblateSpec"]["properties"]["mode"]["enum"]) == {"zero", "mean", "resample"}
    assert {"vector", "coeff"} <= set(schemas["SteerSpec"]["properties"])
    assert "direction" in schemas["ProjectOutSpec"]["required"]
    source = schemas["PatchSpec"]["properties"]["source"]
    refs = {item["$ref"].rsplit("/", 1)[-1] for item in source["anyOf"]}
    assert refs == {"CacheSource", "TensorSource", "BatchSource"}
    json_tensor_schema = schemas["JsonTensor"]
    assert set(json_tensor_schema["required"]) == {"dtype", "shape", "data"}


def test_openapi_declares_msgpack_request_bodies(openapi: dict[str, Any]) -> None:
    for path in REQUEST_SCHEMAS:
        content = openapi["paths"][path]["post"]["requestBody"]["content"]
        assert "application/msgpack" in content, path
