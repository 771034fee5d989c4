"""Ownership of stored tensors and caches (issue 9, contract9 "Ownership").

A (alice) and B (bob) each store a tensor (``store_tensor``) and a cache
(``run_with_cache(..., store=True)``) through the real client. Then:

* B gets 404 ``not_found`` for A's objects on GET and DELETE, as a ``{"ref": …}`` steering
  vector, as a ``{"cache": …}`` patch source and as a patching ``clean_cache`` — the very answer
  a never-made id gets (same status, code and message up to the id), while A's own identical
  requests succeed;
* the real client raises ``NotFoundError`` for B in the same cases;
* ``GET /v1/tensors`` / ``GET /v1/caches`` list only one's own objects (``owner`` = the key
  name); the admin (root) lists both and can read and delete any;
* A deleting B's ids gets 404 and B's objects survive: B still reads the same values and can
  still use its cache.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from hooklab import errors, hooks

from .harness import Accounts, assert_error, json_tensor, tensor_from

pytestmark = pytest.mark.slow

D_MODEL = 64
TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11]]
CORRUPTED = [[6, 18, 43, 98, 4, 251, 8, 12]]
RESID_PRE = "blocks.0.hook_resid_pre"
LOGIT_DIFF = {"kind": "logit_diff", "answer": 5, "wrong": 6}


@dataclass
class Owned:
    tensor_id: str
    cache_id: str
    vector: torch.Tensor
    cache_values: dict[str, torch.Tensor]


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


def _make(accounts: Accounts, name: str, seed: int) -> Owned:
    model = accounts.connect(name)
    vector = _vector(seed)
    tensor_id = model.store_tensor(vector)
    _, cache = model.run_with_cache(
        torch.tensor(TOKENS), names_filter=lambda hook: hook.endswith("hook_resid_pre"), store=True
    )
    assert cache.cache_id, "run_with_cache(store=True) gave no cache id"
    values = {hook: cache[hook].clone() for hook in cache.keys()}  # noqa: SIM118
    return Owned(tensor_id, cache.cache_id, vector, values)


@pytest.fixture(scope="module")
def owned(accounts: Accounts) -> dict[str, Owned]:
    return {"alice": _make(accounts, "alice", 1), "bob": _make(accounts, "bob", 2)}


def _steer(ref: str) -> dict[str, Any]:
    return {"input": TOKENS, "hooks": [{"hook": RESID_PRE, "op": "steer", "vector": {"ref": ref}}]}


def _patch(cache_id: str) -> dict[str, Any]:
    return {
        "input": TOKENS,
        "hooks": [{"hook": RESID_PRE, "op": "patch", "source": {"cache": cache_id}}],
    }


def _patching(cache_id: str) -> dict[str, Any]:
    return {
        "corrupted": CORRUPTED, "clean_cache": cache_id, "activation": "resid_pre",
        "axes": ["layer", "pos"], "metric": LOGIT_DIFF,
    }  # fmt: skip


# (label, method, path, body) of every way to use an object, built from (tensor id, cache id)
def _uses(tensor_id: str, cache_id: str) -> list[tuple[str, str, str, Any]]:
    return [
        ("GET tensor", "GET", f"/v1/tensors/{tensor_id}", None),
        ("GET cache", "GET", f"/v1/caches/{cache_id}", None),
        ("steer ref", "POST", "/v1/run_with_hooks", _steer(tensor_id)),
        ("patch source", "POST", "/v1/run_with_hooks", _patch(cache_id)),
        ("patching clean_cache", "POST", "/v1/patching", _patching(cache_id)),
    ]


def _same_message(theirs: str, their_id: str, missing: str, missing_id: str) -> bool:
    """The two 404 messages are the same once the ids are blanked out."""
    return theirs.replace(their_id, "<id>") == missing.replace(missing_id, "<id>")


def test_ids_are_unguessable(owned: dict[str, Owned]) -> None:
    ids = [owned[name].tensor_id for name in owned] + [owned[name].cache_id for name in owned]
    assert len(set(ids)) == len(ids), ids
    for object_id in ids:
        assert re.fullmatch(r"[tc]_[A-Za-z0-9_\-]{16,}", object_id), (
            f"{object_id!r}: ids keep their t_/c_ prefix and at least 16 random characters"
        )


def test_each_key_can_use_its_own_objects(accounts: Accounts, owned: dict[str, Owned]) -> None:
    """The controls: every use the other key is refused works for the owner."""
    for name in ("alice", "bob"):
        mine = owned[name]
        with accounts.api(name) as api:
            for label, method, path, body in _uses(mine.tensor_id, mine.cache_id):
                response = api.request(method, path, json=body)
                assert response.status_code == 200, (
                    f"{name}, own {label}: {response.status_code} {response.text[:300]}"
                )
            got = tensor_from(api.get(f"/v1/tensors/{mine.tensor_id}"), mine.tensor_id)
            assert torch.equal(got, mine.vector)


def test_another_keys_objects_are_404_like_missing_ones(
    accounts: Accounts, owned: dict[str, Owned]
) -> None:
    alice = owned["alice"]
    fake_tensor = "t_" + secrets.token_hex(8)
    fake_cache = "c_" + secrets.token_hex(8)
    theirs_uses = _uses(alice.tensor_id, alice.cache_id)
    missing_uses = _uses(fake_tensor, fake_cache)
    with accounts.api("bob") as bob:
        for (label, method, path, body), (_, _, missing_path, missing_body) in zip(
            theirs_uses, missing_uses, strict=True
        ):
            theirs = bob.request(method, path, json=body)
            missing = bob.request(method, missing_path, json=missing_body)
            error = assert_error(theirs, 404, "not_found")
            missing_error = assert_error(missing, 404, "not_found")
            their_id = alice.tensor_id if "tensor" in label or "ref" in label else alice.cache_id
            missing_id = fake_tensor if their_id == alice.tensor_id else fake_cache
            assert _same_message(
                error["message"], their_id, missing_error["message"], missing_id
            ), (
                f"bob, alice's {label}: the 404 must not tell an existing id from a missing one:\n"
                f"  theirs:  {error['message']!r}\n  missing: {missing_error['message']!r}"
            )
            assert "alice" not in theirs.text, f"bob, alice's {label}: names the owner"
        for kind, object_id in (("tensors", alice.tensor_id), ("caches", alice.cache_id)):
            response = bob.delete(f"/v1/{kind}/{object_id}")
            assert_error(response, 404, "not_found")
            missing = bob.delete(f"/v1/{kind}/{fake_tensor if kind == 'tensors' else fake_cache}")
            assert_error(missing, 404, "not_found")
    # ... and alice's objects are untouched by all that
    with accounts.api("alice") as api:
        got = tensor_from(api.get(f"/v1/tensors/{alice.tensor_id}"), alice.tensor_id)
        assert torch.equal(got, alice.vector)
        response = api.get(f"/v1/caches/{alice.cache_id}")
        assert response.status_code == 200, response.text[:300]


def test_the_client_raises_not_found_for_another_keys_objects(
    accounts: Accounts, owned: dict[str, Owned]
) -> None:
    alice = owned["alice"]
    bob = accounts.connect("bob")
    tokens = torch.tensor(TOKENS)
    with pytest.raises(errors.NotFoundError) as caught:
        bob.run_with_hooks(tokens, fwd_hooks=[(RESID_PRE, hooks.steer(alice.tensor_id, 2.0))])
    assert caught.value.status == 404
    with pytest.raises(errors.NotFoundError):
        bob.run_with_hooks(tokens, fwd_hooks=[(RESID_PRE, hooks.patch(alice.cache_id))])
    for object_id in (alice.tensor_id, alice.cache_id):
        with pytest.raises(errors.NotFoundError):
            bob.delete_stored(object_id)


def _listing(api: Any, kind: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/{kind}")
    assert response.status_code == 200, f"GET /v1/{kind}: {response.status_code} {response.text}"
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("objects"), list), body
    return body["objects"]


def test_listing_shows_only_ones_own_and_everything_to_the_admin(
    accounts: Accounts, owned: dict[str, Owned]
) -> None:
    for kind, attr in (("tensors", "tensor_id"), ("caches", "cache_id")):
        for name, other in (("alice", "bob"), ("bob", "alice")):
            with accounts.api(name) as api:
                objects = _listing(api, kind)
            ids = {obj["id"] for obj in objects}
            assert getattr(owned[name], attr) in ids, f"{name}'s {kind} listing lacks its own"
            assert getattr(owned[other], attr) not in ids, f"{name} sees {other}'s {kind}"
            assert all(obj.get("owner") == name for obj in objects), (
                f"{name}'s {kind} listing holds objects it does not own: "
                f"{[(obj['id'], obj.get('owner')) for obj in objects if obj.get('owner') != name]}"
            )
            expected_kind = kind.removesuffix("s")
            assert all(obj.get("kind") == expected_kind for obj in objects), objects
        with accounts.api("root") as api:
            objects = {obj["id"]: obj for obj in _listing(api, kind)}
        for name in ("alice", "bob"):
            object_id = getattr(owned[name], attr)
            assert object_id in objects, f"the admin's {kind} listing lacks {name}'s"
            assert objects[object_id].get("owner") == name, objects[object_id]


def test_the_admin_reads_and_deletes_any_object(
    accounts: Accounts, owned: dict[str, Owned]
) -> None:
    alice, bob = owned["alice"], owned["bob"]
    with accounts.api("root") as root:
        got = tensor_from(root.get(f"/v1/tensors/{alice.tensor_id}"), alice.tensor_id)
        assert torch.equal(got, alice.vector)
        response = root.get(f"/v1/caches/{bob.cache_id}")
        for hook, value in bob.cache_values.items():
            assert torch.equal(tensor_from(response, hook), value), hook
    # an extra tensor of alice's, deleted by the admin
    with accounts.api("alice") as api:
        created = api.post("/v1/tensors", json={"tensor": json_tensor(_vector(3))})
        assert created.status_code == 201, created.text
        extra = created.json()["id"]
        assert created.json().get("owner") == "alice", created.json()
        with accounts.api("root") as root:
            assert root.delete(f"/v1/tensors/{extra}").status_code == 204
            assert_error(root.get(f"/v1/tensors/{extra}"), 404, "not_found")
        assert_error(api.get(f"/v1/tensors/{extra}"), 404, "not_found")
        assert extra not in {obj["id"] for obj in _listing(api, "tensors")}


def test_deleting_another_keys_id_is_404_and_the_object_survives(
    accounts: Accounts, owned: dict[str, Owned]
) -> None:
    bob = owned["bob"]
    with accounts.api("alice") as alice:
        assert_error(alice.delete(f"/v1/tensors/{bob.tensor_id}"), 404, "not_found")
        assert_error(alice.delete(f"/v1/caches/{bob.cache_id}"), 404, "not_found")
    alice_client = accounts.connect("alice")
    for object_id in (bob.tensor_id, bob.cache_id):
        with pytest.raises(errors.NotFoundError):
            alice_client.delete_stored(object_id)
    with accounts.api("bob") as api:
        got = tensor_from(api.get(f"/v1/tensors/{bob.tensor_id}"), bob.tensor_id)
        assert torch.equal(got, bob.vector), "bob's tensor changed"
        response = api.get(f"/v1/caches/{bob.cache_id}")
        for hook, value in bob.cache_values.items():
            assert torch.equal(tensor_from(response, hook), value), f"bob's cache {hook} changed"
        for label, method, path, body in _uses(bob.tensor_id, bob.cache_id):
            response = api.request(method, path, json=body)
            assert response.status_code == 200, f"bob, own {label}: {response.text[:300]}"
        ids = {obj["id"] for obj in _listing(api, "tensors")}
        assert bob.tensor_id in ids
