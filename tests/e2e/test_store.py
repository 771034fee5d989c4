"""Stored tensors and caches: create, read, use, delete; TTL expiry; the byte cap; and the client's
typed exceptions for each failure."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import torch

import hooklab
from hooklab import errors, hooks

from .e2e_helpers import FRAMES, assert_close, edit, parse_frames, tensors_of
from .e2e_servers import Served, sample_tokens

JSON = {"accept": "application/json"}


def _vector(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def _json(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "F32", "shape": list(tensor.shape), "data": tensor.tolist()}


# ---- tensors ---------------------------------------------------------------------------------


def test_tensor_post_get_delete(http: httpx.Client) -> None:
    value = _vector(12).reshape(3, 4)
    before = time.time()
    response = http.post("/v1/tensors", json={"tensor": _json(value), "ttl_s": 120})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"].startswith("t_") and info["kind"] == "tensor"
    assert info["shape"] == [3, 4] and info["nbytes"] == 48
    assert before + 110 < info["expires_at"] < time.time() + 130
    object_id = info["id"]
    for accept in ("application/json", "application/vnd.hooklab.frames+msgpack"):
        got = tensors_of(http.get(f"/v1/tensors/{object_id}", headers={"accept": accept}))
        assert torch.equal(got[object_id], value), accept
    assert http.delete(f"/v1/tensors/{object_id}").status_code == 204
    for method in ("GET", "DELETE"):
        gone = http.request(method, f"/v1/tensors/{object_id}")
        assert gone.status_code == 404, method
        assert gone.json()["error"]["code"] == "not_found"
        assert object_id in gone.json()["error"]["message"]


def test_tensor_and_cache_ids_are_not_interchangeable(
    gpt2_server: Served, http: httpx.Client
) -> None:
    tensor_id = gpt2_server.model.store_tensor(_vector(4))
    assert http.get(f"/v1/caches/{tensor_id}").status_code == 404
    gpt2_server.model.delete_stored(tensor_id)


def test_client_store_tensor_and_steer_by_id(gpt2_server: Served) -> None:
    model, tl = gpt2_server.model, gpt2_server.tl
    vector = _vector(tl.cfg.d_model, 5)
    object_id = model.store_tensor(vector)
    tokens = sample_tokens(tl)
    name = "blocks.1.hook_resid_pre"
    actual = model.run_with_hooks(tokens, fwd_hooks=[(name, hooks.steer(object_id, 3.0))])
    expected = tl.run_with_hooks(
        tokens, fwd_hooks=[(name, edit(lambda x: x + 3 * vector, "bpd", {}))]
    )
    assert_close(actual, expected, "logits")
    model.delete_stored(object_id)
    with pytest.raises(errors.NotFoundError) as caught:
        model.run_with_hooks(tokens, fwd_hooks=[(name, hooks.steer(object_id, 3.0))])
    assert caught.value.status == 404 and object_id in caught.value.message
    with pytest.raises(errors.NotFoundError):
        model.delete_stored(object_id)


# ---- caches ----------------------------------------------------------------------------------


def test_stored_cache_get_patch_delete(server: Served) -> None:
    model, tl = server.model, server.tl
    clean, corrupted = sample_tokens(tl, seed=1), sample_tokens(tl, seed=2)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    _, cache = model.run_with_cache(clean, names_filter=names, store=True)
    cache_id = cache.cache_id
    assert isinstance(cache_id, str) and cache_id.startswith("c_")
    _, ref_cache = tl.run_with_cache(clean, names_filter=names)

    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.get(f"/v1/caches/{cache_id}", headers={"accept": FRAMES})
        assert response.status_code == 200
        begin, stored, _ = parse_frames(response.content)
        assert begin.get("cache_id") == cache_id
        assert set(stored) == set(names)
        for name in names:
            assert_close(stored[name], ref_cache[name], name)
        as_json = http.get(f"/v1/caches/{cache_id}", headers=JSON).json()
        assert as_json["cache_id"] == cache_id and set(as_json["tensors"]) == set(names)

    # patching: the clean activation at one position / one head, into the corrupted run
    patched = model.run_with_hooks(
        corrupted,
        fwd_hooks=[
            ("blocks.0.hook_resid_post", hooks.patch(cache_id, pos=[3])),
            ("blocks.1.attn.hook_z", hooks.patch(cache_id, head=[2])),
        ],
    )
    clean_resid, clean_z = ref_cache[names[0]], ref_cache[names[1]]
    expected = tl.run_with_hooks(
        corrupted,
        fwd_hooks=[
            (names[0], edit(lambda x: clean_resid, "bpd", {"pos": [3]})),
            (names[1], edit(lambda x: clean_z, "bphd", {"head": [2]})),
        ],
    )
    assert_close(patched, expected, "patched logits")

    # a hook point the cache lacks
    with pytest.raises(errors.NotFoundError, match="hook_resid_pre"):
        model.run_with_hooks(
            corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", hooks.patch(cache_id))]
        )

    model.delete_stored(cache_id)
    with pytest.raises(errors.NotFoundError, match=cache_id):
        model.run_with_hooks(corrupted, fwd_hooks=[(names[0], hooks.patch(cache_id))])
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get(f"/v1/caches/{cache_id}").status_code == 404


def test_store_without_returning_the_cache(gpt2_server: Served, http: httpx.Client) -> None:
    tokens = sample_tokens(gpt2_server.tl)
    body = {"input": tokens.tolist(), "names": ["hook_embed"], "store": True, "return_cache": False}
    response = http.post("/v1/run_with_cache", json=body, headers=JSON)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload["tensors"]) == {"output.logits"}
    cache_id = payload["cache_id"]
    stored = http.get(f"/v1/caches/{cache_id}", headers=JSON).json()["tensors"]
    expected = gpt2_server.tl.run_with_cache(tokens, names_filter="hook_embed")[1]["hook_embed"]
    assert torch.allclose(torch.tensor(stored["hook_embed"]["data"]), expected, atol=1e-6)
    assert http.delete(f"/v1/caches/{cache_id}").status_code == 204


# ---- expiry ----------------------------------------------------------------------------------


def test_ttl_expiry(make_server: Any) -> None:
    served: Served = make_server(store_ttl_s=0.5)
    model = served.model
    tensor_id = model.store_tensor(_vector(8))
    _, cache = model.run_with_cache(sample_tokens(served.tl), names_filter="hook_embed", store=True)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        assert http.get(f"/v1/tensors/{tensor_id}").status_code == 200
        assert http.get(f"/v1/caches/{cache.cache_id}").status_code == 200
        time.sleep(0.8)
        for path in (f"/v1/tensors/{tensor_id}", f"/v1/caches/{cache.cache_id}"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert "expire" in (response.json()["error"]["hint"] or "")
    with pytest.raises(errors.NotFoundError):
        model.run_with_hooks(
            sample_tokens(served.tl), fwd_hooks=[("hook_embed", hooks.steer(tensor_id))]
        )


def test_per_object_ttl_is_capped_and_expires(gpt2_server: Served, http: httpx.Client) -> None:
    short = http.post("/v1/tensors", json={"tensor": _json(_vector(4)), "ttl_s": 0.3}).json()
    capped = http.post("/v1/tensors", json={"tensor": _json(_vector(4)), "ttl_s": 1e9}).json()
    limit = http.get("/v1/model").json()["limits"]["store_ttl_s"]
    assert capped["expires_at"] <= time.time() + limit + 1
    time.sleep(0.5)
    assert http.get(f"/v1/tensors/{short['id']}").status_code == 404
    assert http.get(f"/v1/tensors/{capped['id']}").status_code == 200
    http.delete(f"/v1/tensors/{capped['id']}")


# ---- byte cap --------------------------------------------------------------------------------


def test_store_full(limited_server: Served) -> None:
    """4096-byte store: two tensors of 1536 bytes fill it (each object also counts 512 bytes of
    bookkeeping); the next put is refused with 507 and a clear message, and nothing stored is
    evicted."""
    model = limited_server.model
    first, second = _vector(384, 1), _vector(384, 2)
    first_id, second_id = model.store_tensor(first), model.store_tensor(second)
    with httpx.Client(base_url=limited_server.url, timeout=60) as http:
        response = http.post("/v1/tensors", json={"tensor": _json(_vector(1))})
        assert response.status_code == 507
        error = response.json()["error"]
        assert error["code"] == "store_full"
        assert "4 bytes" in error["message"] and "4096" in error["message"]
        assert "delete" in error["hint"]
        with pytest.raises(errors.StoreFullError) as caught:
            model.store_tensor(_vector(1))
        assert caught.value.status == 507
        # a cache that does not fit is refused the same way, and nothing runs half-way
        with pytest.raises(errors.StoreFullError):
            model.run_with_cache(
                sample_tokens(limited_server.tl), names_filter="hook_embed", store=True
            )
        for object_id, value in ((first_id, first), (second_id, second)):
            got = tensors_of(http.get(f"/v1/tensors/{object_id}"))
            assert torch.equal(got[object_id], value)
        model.delete_stored(first_id)
        assert http.post("/v1/tensors", json={"tensor": _json(_vector(1))}).status_code == 201


# ---- typed client exceptions -----------------------------------------------------------------


def test_typed_client_exceptions(limited_server: Served) -> None:
    model = limited_server.model
    tokens = sample_tokens(limited_server.tl)
    cases: list[tuple[type[errors.ServerError], int, str, dict[str, Any]]] = [
        (errors.UnknownHookError, 422, "unknown_hook",
         {"fwd_hooks": [("blocks.0.hook_resid_pots", hooks.ablate())]}),
        (errors.BadIndexError, 422, "bad_index",
         {"fwd_hooks": [("blocks.0.attn.hook_z", hooks.ablate(head=9))]}),
        (errors.BadShapeError, 422, "bad_shape",
         {"fwd_hooks": [("hook_embed", hooks.steer(torch.ones(3)))]}),
        (errors.ConflictingSpecsError, 422, "conflicting_specs",
         {"fwd_hooks": [("hook_embed", hooks.ablate()), ("hook_embed", hooks.set(1.0))]}),
        (errors.InvalidRequestError, 422, "validation_error",
         {"fwd_hooks": [("hook_embed", hooks.clamp())]}),
        (errors.NotFoundError, 404, "not_found",
         {"fwd_hooks": [("hook_embed", hooks.patch("c_0000"))]}),
    ]  # fmt: skip
    for exc_type, status, code, kwargs in cases:
        with pytest.raises(exc_type) as caught:
            model.run_with_hooks(tokens, **kwargs)
        assert caught.value.status == status and caught.value.code == code, caught.value
        assert isinstance(caught.value, errors.ServerError)
        assert isinstance(caught.value, errors.HooklabError)
    with pytest.raises(errors.TooLargeError) as too_large:
        model(torch.randint(3, 100, (5, 4)))
    assert too_large.value.status == 413 and "limit of 4" in too_large.value.message
    with pytest.raises(errors.InvalidRequestError, match="remove_batch_dim"):
        model.run_with_cache(tokens, names_filter="hook_embed", remove_batch_dim=True)
    with pytest.raises(KeyError):
        model.parameter("W_nope")


def test_connection_failed_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(errors.ConnectionFailedError):
        hooklab.connect(f"http://127.0.0.1:{port}", timeout=5)


def test_patch_from_a_cache_of_another_length_is_a_bad_shape(gpt2_server: Served) -> None:
    model = gpt2_server.model
    name = "blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(
        sample_tokens(gpt2_server.tl, pos=6), names_filter=name, store=True
    )
    try:
        with pytest.raises(errors.BadShapeError, match=r"\[2, 6, 64\].*expected \[2, 7, 64\]"):
            model.run_with_hooks(
                sample_tokens(gpt2_server.tl, pos=7),
                fwd_hooks=[(name, hooks.patch(cache.cache_id))],
            )
    finally:
        model.delete_stored(cache.cache_id)


def test_stored_cache_with_remove_batch_dim_is_a_patch_source(gpt2_server: Served) -> None:
    model, tl = gpt2_server.model, gpt2_server.tl
    name = "blocks.0.hook_resid_post"
    clean, corrupted = sample_tokens(tl, batch=1, seed=1), sample_tokens(tl, batch=1, seed=2)
    _, cache = model.run_with_cache(clean, names_filter=name, remove_batch_dim=True, store=True)
    try:
        actual = model.run_with_hooks(corrupted, fwd_hooks=[(name, hooks.patch(cache.cache_id))])
    finally:
        model.delete_stored(cache.cache_id)
    source = tl.run_with_cache(clean, names_filter=name)[1][name]
    expected = tl.run_with_hooks(corrupted, fwd_hooks=[(name, edit(lambda x: source, "bpd", {}))])
    assert_close(actual, expected, "logits")
