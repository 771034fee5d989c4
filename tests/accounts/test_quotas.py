"""Per-key quotas and ``GET /v1/usage`` (issue 9, contract9 "Quotas → 429").

Each quota is set small for one key with ``keys add --quota NAME=VALUE`` (conftest.py):

* ``concurrent_requests=1`` (conc): a slow generate (bounded by its own ``timeout_s``) runs;
  a second request of the same key meanwhile gets 429 ``quota`` with ``Retry-After`` naming the
  quota and the usage (1); the admin's usage shows 1 running; after the first ends, it succeeds.
* ``tokens_per_minute=40`` (tpm): forwards (prompt tokens) and a generate (prompt + generated)
  are counted exactly in ``/v1/usage``; the request that would pass 40 gets 429 with
  ``1 <= Retry-After <= 60`` and is not counted. The window is a sliding 60 s and the contract
  offers no way to shorten it, so "the next window succeeds" is not waited for here.
* ``stored_bytes=8192`` (store): storing 1 KiB tensors through the real client ends in
  ``QuotaError`` (429, ``retry_after``); a raw store then gets 429 + ``Retry-After``; deleting
  one makes room again; other keys are not affected.
* ``max_new_tokens=5`` (newtok) and ``max_patching_forwards`` (patchfwd: 20, *above* the
  server-wide default 8 that alice gets): 429 ``quota`` naming the quota, no ``Retry-After``.
* ``GET /v1/usage``: a key sees its own usage and its limits (per-key values over the defaults);
  the admin sees every key.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest
import torch

from hooklab import errors

from .harness import (
    QUOTAS,
    Accounts,
    assert_error,
    json_tensor,
    retry_after,
    wait_until,
)

pytestmark = pytest.mark.slow

LOGIT_DIFF = {"kind": "logit_diff", "answer": 5, "wrong": 6}
USAGE_FIELDS = {"concurrent_requests", "tokens_last_minute", "stored_bytes"}


def ids(batch: int, pos: int, seed: int = 0) -> list[list[int]]:
    """Deterministic token ids in 3..999 (no special tokens)."""
    return [
        [(seed * 31 + row * 7 + col * 13) % 997 + 3 for col in range(pos)] for row in range(batch)
    ]


def assert_quota(
    response: httpx.Response, quota: str, usage: int | None = None, retry: bool = True
) -> dict[str, Any]:
    """429 ``quota`` whose message names ``quota`` (and ``usage``, when given); with
    ``Retry-After`` (integer seconds) when ``retry``, without it otherwise."""
    error = assert_error(response, 429, "quota", says=re.escape(quota))
    if usage is not None:
        assert re.search(rf"(?<![\d.]){usage}(?![\d.])", error["message"]), (
            f"the 429 message should give the current usage ({usage}): {error['message']!r}"
        )
    if retry:
        retry_after(response)
    else:
        assert "retry-after" not in response.headers, (
            f"{quota}: waiting does not help, so no Retry-After "
            f"(got {response.headers['retry-after']!r})"
        )
    return error


def usage_of(api: httpx.Client) -> dict[str, Any]:
    response = api.get("/v1/usage")
    assert response.status_code == 200, f"GET /v1/usage: {response.status_code} {response.text}"
    return response.json()


def _quota_error() -> type[Exception]:
    cls = getattr(errors, "QuotaError", None)
    assert cls is not None, "hooklab.errors has no QuotaError"
    assert issubclass(cls, errors.ServerError)
    return cls


# ---- concurrent_requests -----------------------------------------------------------------------

# ~2-3 s of work on 2 cores without a KV cache (64 prompts, 120 steps), cut at 2.5 s by its own
# deadline: long enough to overlap, bounded either way.
SLOW_GENERATE = {
    "input": ids(64, 8), "max_new_tokens": 120, "stop_at_eos": False, "do_sample": False,
    "use_past_kv_cache": False, "timeout_s": 2.5,
}  # fmt: skip


def test_concurrent_requests_quota(accounts: Accounts) -> None:
    result: dict[str, httpx.Response] = {}
    with (
        accounts.api("conc") as slow_api,
        accounts.api("conc") as api,
        accounts.api("root") as root,
    ):
        thread = threading.Thread(
            target=lambda: result.update(first=slow_api.post("/v1/generate", json=SLOW_GENERATE)),
            daemon=True,
        )
        thread.start()
        running = wait_until(
            lambda: (
                (accounts.metrics().value("hooklab_inflight_requests", op="generate") or 0) >= 1
                or not thread.is_alive()
            ),
            10.0,
        )
        assert running and thread.is_alive(), "the slow generate did not start (or was too quick)"
        second = api.post("/v1/forward", json={"input": ids(1, 8)})
        during = usage_of(root)
        overlapped = thread.is_alive()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the slow generate did not end"
        assert overlapped, "the slow generate ended before the second request: no overlap"
        first = result["first"]
        assert first.status_code in (200, 504), f"slow generate: {first.status_code} {first.text}"
        assert_quota(second, "concurrent_requests", usage=1)

        entries = {entry["key"]: entry for entry in during.get("keys") or []}
        assert "conc" in entries, f"the admin's usage lacks conc: {during}"
        assert entries["conc"]["usage"]["concurrent_requests"] == 1, entries["conc"]

        def succeeds() -> bool:
            return api.post("/v1/forward", json={"input": ids(1, 8)}).status_code == 200

        assert wait_until(succeeds, 2.0, 0.1), "the key stays refused after its request ended"
        assert usage_of(api)["usage"]["concurrent_requests"] in (0, 1)  # 1: this very request


# ---- tokens_per_minute -------------------------------------------------------------------------


def test_tokens_per_minute_quota_counts_prompt_and_generated_tokens(accounts: Accounts) -> None:
    limit = accounts.limits_of("tpm")["tokens_per_minute"]
    assert limit == 40
    used = 0
    with accounts.api("tpm") as api:
        assert usage_of(api)["usage"]["tokens_last_minute"] == 0
        for batch in (1, 2):
            response = api.post("/v1/forward", json={"input": ids(batch, 8, seed=batch)})
            assert response.status_code == 200, response.text[:300]
            used += batch * 8
        generated = api.post(
            "/v1/generate",
            json={"input": [[5, 6, 7, 8]], "max_new_tokens": 4, "stop_at_eos": False,
                  "do_sample": False, "return_type": "tokens"},
        )  # fmt: skip
        assert generated.status_code == 200, generated.text[:300]
        tokens = generated.json()["tokens"]
        assert len(tokens[0]) == 8, tokens  # 4 prompt + 4 generated
        used += len(tokens[0])
        usage = usage_of(api)
        assert usage["key"] == "tpm" and usage["limits"]["tokens_per_minute"] == limit, usage
        assert usage["usage"]["tokens_last_minute"] == used == 32, (
            f"prompt tokens of the forwards + prompt and generated tokens of the generate = "
            f"{used}; /v1/usage says {usage['usage']}"
        )
        response = api.post("/v1/forward", json={"input": ids(1, 8, seed=3)})  # 40: at the limit
        assert response.status_code == 200, response.text[:300]
        used += 8
        over = api.post("/v1/forward", json={"input": ids(1, 8, seed=4)})
        assert_quota(over, "tokens_per_minute", usage=used)
        assert 1 <= retry_after(over) <= 60, over.headers["retry-after"]
        over_generate = api.post("/v1/generate", json={"input": [[5, 6]], "max_new_tokens": 1})
        assert_quota(over_generate, "tokens_per_minute")
        assert 1 <= retry_after(over_generate) <= 60
        assert usage_of(api)["usage"]["tokens_last_minute"] == used, (
            "refused requests ran no tokens, so they must not count"
        )
    with accounts.api("bob") as other:  # the quota is tpm's alone
        assert other.post("/v1/forward", json={"input": ids(1, 8)}).status_code == 200


# ---- stored_bytes ------------------------------------------------------------------------------


def test_stored_bytes_quota(accounts: Accounts) -> None:
    quota_error = _quota_error()
    limit = accounts.limits_of("store")["stored_bytes"]
    model = accounts.connect("store")
    stored: list[str] = []
    caught = None
    for index in range(16):  # 1 KiB each: the 8 KiB quota is reached within 8
        try:
            stored.append(model.store_tensor(torch.full((256,), float(index))))
        except quota_error as exc:
            caught = exc
            break
    assert caught is not None, f"{len(stored)} KiB stored under a {limit} byte quota"
    assert 2 <= len(stored) <= limit // 1024, stored
    assert caught.status == 429 and caught.code == "quota", caught
    assert "stored_bytes" in caught.message, caught.message
    assert isinstance(caught.retry_after, int | float) and caught.retry_after >= 0, (
        caught.retry_after
    )

    with accounts.api("store") as api:
        over = api.post("/v1/tensors", json={"tensor": json_tensor(torch.zeros(256))})
        assert_quota(over, "stored_bytes")
        usage = usage_of(api)
        assert usage["limits"]["stored_bytes"] == limit
        assert len(stored) * 1024 <= usage["usage"]["stored_bytes"] <= limit, usage
        with pytest.raises(quota_error):  # a stored cache counts too
            model.run_with_cache(torch.tensor(ids(1, 8)), store=True)

        model.delete_stored(stored.pop(0))
        again = api.post("/v1/tensors", json={"tensor": json_tensor(torch.zeros(256))})
        assert again.status_code == 201, f"after a delete: {again.status_code} {again.text}"
        stored.append(again.json()["id"])

    with accounts.api("alice") as other:  # the quota is store's alone
        response = other.post("/v1/tensors", json={"tensor": json_tensor(torch.zeros(256))})
        assert response.status_code == 201, response.text
        assert other.delete(f"/v1/tensors/{response.json()['id']}").status_code == 204
    for object_id in stored:
        model.delete_stored(object_id)
    with accounts.api("store") as api:
        assert usage_of(api)["usage"]["stored_bytes"] == 0, "deleted objects still count"


# ---- max_new_tokens, max_patching_forwards -----------------------------------------------------


def test_max_new_tokens_quota(accounts: Accounts) -> None:
    assert accounts.limits_of("newtok")["max_new_tokens"] == 5
    body = {"input": [[5, 6, 7, 8]], "stop_at_eos": False, "do_sample": False}
    with accounts.api("newtok") as api:
        assert_quota(api.post("/v1/generate", json={**body, "max_new_tokens": 6}),
                     "max_new_tokens", retry=False)  # fmt: skip
        response = api.post("/v1/generate", json={**body, "max_new_tokens": 5})
        assert response.status_code == 200, response.text[:300]
    quota_error = _quota_error()
    model = accounts.connect("newtok")
    with pytest.raises(quota_error) as caught:
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, verbose=False)
    assert caught.value.status == 429 and "max_new_tokens" in caught.value.message
    assert caught.value.retry_after is None


def test_quota_refusals_are_counted_by_key_name_and_quota(accounts: Accounts) -> None:
    def refusals() -> float:
        found = accounts.metrics().value(
            "hooklab_quota_refusals_total", key="newtok", quota="max_new_tokens"
        )
        return found or 0.0

    before = refusals()
    body = {"input": [[5, 6, 7, 8]], "max_new_tokens": 9, "stop_at_eos": False}
    with accounts.api("newtok") as api:
        for _ in range(2):
            assert_quota(api.post("/v1/generate", json=body), "max_new_tokens", retry=False)
    assert refusals() == before + 2


def _patching(pos: int) -> dict[str, Any]:
    """resid_pre over [layer, pos]: 2 x pos rows, one patched forward each."""
    return {
        "corrupted": ids(1, pos), "clean": ids(1, pos, seed=1), "activation": "resid_pre",
        "axes": ["layer", "pos"], "metric": LOGIT_DIFF, "patches_per_forward": 1,
    }  # fmt: skip


def test_max_patching_forwards_quota_per_key_and_server_default(accounts: Accounts) -> None:
    assert accounts.limits_of("patchfwd")["max_patching_forwards"] == 20
    assert accounts.limits_of("alice")["max_patching_forwards"] == 8  # the server-wide default
    with accounts.api("patchfwd") as api:
        response = api.post("/v1/patching", json=_patching(8))  # 16 forwards <= 20
        assert response.status_code == 200, response.text[:300]
        assert_quota(api.post("/v1/patching", json=_patching(12)),  # 24 > 20
                     "max_patching_forwards", retry=False)  # fmt: skip
    with accounts.api("alice") as api:
        assert_quota(api.post("/v1/patching", json=_patching(8)),  # 16 > 8
                     "max_patching_forwards", retry=False)  # fmt: skip
        response = api.post("/v1/patching", json=_patching(2))  # 4 forwards
        assert response.status_code == 200, response.text[:300]


# ---- GET /v1/usage -----------------------------------------------------------------------------


def _check_entry(accounts: Accounts, entry: dict[str, Any], name: str) -> None:
    assert entry.get("key") == name, entry
    assert entry.get("admin") is (name in accounts.admins), entry
    assert set(entry.get("usage", {})) >= USAGE_FIELDS, entry
    assert all(isinstance(entry["usage"][f], int) for f in USAGE_FIELDS), entry
    assert entry.get("limits") == accounts.limits_of(name), (
        f"{name}'s limits: expected {accounts.limits_of(name)}, got {entry.get('limits')}"
    )


@pytest.mark.parametrize("name", ["alice", "bob", "conc", "tpm", "store", "newtok", "patchfwd"])
def test_usage_shows_a_key_its_own_usage_and_limits(accounts: Accounts, name: str) -> None:
    with accounts.api(name) as api:
        body = usage_of(api)
    _check_entry(accounts, body, name)
    assert set(body["limits"]) == set(QUOTAS)
    others = {entry.get("key") for entry in body.get("keys") or []} - {name}
    assert not others, f"{name} sees the usage of {sorted(others)}"


def test_usage_shows_the_admin_every_key(accounts: Accounts) -> None:
    with accounts.api("root") as api:
        body = usage_of(api)
    _check_entry(accounts, body, "root")
    entries = {entry["key"]: entry for entry in body.get("keys") or []}
    expected = set(accounts.keys) - {"revoked"}
    assert expected <= set(entries), f"missing from the admin's usage: {expected - set(entries)}"
    for name in expected:
        _check_entry(accounts, entries[name], name)
