"""API keys (issue 9, contract9 "Keys"): the CLI, 401s, open routes, revocation, the client.

* ``keys add`` prints a distinct random ``hl_…`` key per call; the keys file holds no key (only
  hashes); ``keys list`` prints names, never keys.
* A missing, malformed, unknown or revoked key gets 401 ``unauthorized`` (error envelope) with
  ``WWW-Authenticate: Bearer``, on every ``/v1/`` route of ``/openapi.json`` (except
  ``/v1/capabilities``, open by the contract) and before the body is looked at; the 401 never
  echoes what was sent.
* ``/healthz``, ``/readyz``, ``/metrics``, ``/docs``, ``/openapi.json`` (and ``/v1/capabilities``)
  answer without a key.
* ``keys revoke`` while the server runs: the key gets 401 within ~2 s, the others keep working;
  ``keys add`` while it runs: the new key works within ~2 s (the server re-reads the file when it
  changes).
* The client: ``hooklab.connect(url, api_key=…)`` and ``HOOKLAB_API_KEY`` send the key; a wrong
  or missing key raises ``hooklab.errors.UnauthorizedError`` (status 401).
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any

import httpx
import pytest
import torch

from hooklab import errors

from .harness import KEY_PATTERN, KEY_PREFIX, Accounts, add_key, assert_error, keys_cli, wait_until

pytestmark = pytest.mark.slow

TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11]]
FORWARD = {"input": TOKENS}
OPEN_ROUTES = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v1/capabilities")
RELOAD_S = 3.0  # the contract: a revoked key stops working within ~1 s


def _assert_401(response: httpx.Response, sent: str | None = None) -> None:
    assert_error(response, 401, "unauthorized")
    challenge = response.headers.get("www-authenticate")
    assert challenge is not None and challenge.lower().startswith("bearer"), (
        f"401 without 'WWW-Authenticate: Bearer': {dict(response.headers)}"
    )
    secret = (sent or "").split()[-1:] or [""]
    if len(secret[0]) >= 12:  # key-like; "Bearer" may well be named in the message
        assert secret[0] not in response.text, "the 401 echoes the key sent"


def _unauthorized(client: httpx.Client, sent: str | None) -> None:
    """GET /v1/model and POST /v1/forward (a valid body) both get 401."""
    _assert_401(client.get("/v1/model"), sent)
    _assert_401(client.post("/v1/forward", json=FORWARD), sent)


def test_keys_are_distinct_random_hl_keys(accounts: Accounts) -> None:
    keys = list(accounts.keys.values())
    assert len(set(keys)) == len(keys), "two 'keys add' calls printed the same key"
    for name, key in accounts.keys.items():
        assert KEY_PATTERN.match(key), (name, key)
        assert len(key) - len(KEY_PREFIX) >= 20, f"{name}'s key is too short to be unguessable"


def test_the_keys_file_holds_no_key(accounts: Accounts) -> None:
    text = accounts.keys_file.read_text()
    for name, key in accounts.keys.items():
        assert key not in text and key[len(KEY_PREFIX) :] not in text, (
            f"the keys file holds {name}'s key itself (only a hash may be stored)"
        )
        assert name in text, f"the keys file does not name {name}"


def test_keys_cli_takes_keys_file_after_its_arguments(accounts: Accounts) -> None:
    """contract9: ``keys add NAME [--admin] [--quota QUOTA=VALUE ...] [--keys-file PATH]``."""
    done = keys_cli(accounts.keys_file, "list", flag=True)
    assert done.returncode == 0, f"keys list --keys-file PATH: {done.stderr}"
    assert re.search(r"\balice\b", done.stdout), done.stdout


def test_keys_list_prints_names_never_keys(accounts: Accounts) -> None:
    done = keys_cli(accounts.keys_file, "list")
    assert done.returncode == 0, done.stderr
    accounts.traffic.add("keys list (stdout+stderr)", done.stdout + done.stderr)
    for name in ("alice", "bob", "root", "conc", "tpm"):
        assert re.search(rf"\b{name}\b", done.stdout), f"'keys list' does not list {name}"
    for key in accounts.keys.values():
        assert key not in done.stdout + done.stderr
        assert key[len(KEY_PREFIX) :] not in done.stdout + done.stderr


def test_a_good_key_is_let_in(accounts: Accounts) -> None:
    with accounts.api("alice") as api:
        assert api.get("/v1/model").status_code == 200
        assert api.post("/v1/forward", json=FORWARD).status_code == 200


def test_a_missing_key_gets_401(accounts: Accounts) -> None:
    with accounts.api(None) as api:
        _unauthorized(api, None)


def _bad_authorizations(accounts: Accounts) -> dict[str, str]:
    key = accounts.keys["alice"]
    secret = key[len(KEY_PREFIX) :]
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    basic = base64.b64encode(f"alice:{key}".encode()).decode()
    return {
        "scheme_only": "Bearer",
        "prefix_only": f"Bearer {KEY_PREFIX}",
        "no_scheme": key,
        "basic_scheme": f"Basic {basic}",
        "token_scheme": f"Token {key}",
        "two_tokens": f"Bearer {key} {key}",
        "unknown_key": f"Bearer {KEY_PREFIX}{secrets.token_urlsafe(32)}",
        "one_char_changed": f"Bearer {flipped}",
        "one_char_added": f"Bearer {key}A",
        "secret_without_prefix": f"Bearer {secret}",
        "not_ascii_safe": "Bearer hl_%00%ff..",
    }


BAD = (
    "scheme_only", "prefix_only", "no_scheme", "basic_scheme", "token_scheme", "two_tokens",
    "unknown_key", "one_char_changed", "one_char_added", "secret_without_prefix", "not_ascii_safe",
)  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_malformed_or_wrong_key_gets_401(accounts: Accounts, case: str) -> None:
    authorization = _bad_authorizations(accounts)[case]
    accounts.secrets.append(authorization.split()[-1])
    with accounts.raw(authorization) as api:
        _unauthorized(api, authorization)


def _operations(accounts: Accounts) -> list[tuple[str, str]]:
    with accounts.api(None) as api:
        response = api.get("/openapi.json")
    assert response.status_code == 200, response.text[:300]
    operations = []
    for path, item in response.json()["paths"].items():
        if not path.startswith("/v1/") or path == "/v1/capabilities":
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                operations.append((method.upper(), concrete))
    return operations


def test_every_v1_route_needs_a_key(accounts: Accounts) -> None:
    operations = _operations(accounts)
    paths = {path for _, path in operations}
    for expected in ("/v1/forward", "/v1/tensors", "/v1/caches", "/v1/usage", "/v1/patching"):
        assert expected in paths, f"{expected} is not in /openapi.json"
    wrong = f"Bearer {KEY_PREFIX}{secrets.token_urlsafe(32)}"
    accounts.secrets.append(wrong.split()[-1])
    failures = []
    for authorization in (None, wrong):
        with accounts.raw(authorization) as api:
            for method, path in operations:
                # a body the route would refuse (422) if it looked at it before the key
                body: Any = {"not": "a valid body"} if method in ("POST", "PUT", "PATCH") else None
                response = api.request(method, path, json=body)
                if response.status_code != 401 or "www-authenticate" not in response.headers:
                    sent = "no key" if authorization is None else "wrong key"
                    failures.append(
                        f"{method} {path} ({sent}): {response.status_code} {response.text[:120]}"
                    )
                else:
                    _assert_401(response, authorization)
    assert not failures, "routes answering without a valid key:\n" + "\n".join(failures)


@pytest.mark.parametrize("path", OPEN_ROUTES)
def test_open_routes_need_no_key(accounts: Accounts, path: str) -> None:
    with accounts.api(None, accept="*/*") as api:
        response = api.get(path)
    assert response.status_code == 200, f"{path} without a key: {response.status_code}"


def test_a_revoked_key_stops_working_without_a_restart(accounts: Accounts) -> None:
    pid = accounts.server.pid
    with accounts.api("revoked") as api, accounts.api("alice") as alice:
        assert api.get("/v1/model").status_code == 200, "the key works before it is revoked"
        done = keys_cli(accounts.keys_file, "revoke", "revoked")
        assert done.returncode == 0, f"keys revoke failed: {done.stdout}\n{done.stderr}"
        accounts.traffic.add("keys revoke (stdout+stderr)", done.stdout + done.stderr)
        status = wait_until(
            lambda: api.get("/v1/model").status_code == 401, RELOAD_S, interval_s=0.1
        )
        assert status, f"the revoked key still works {RELOAD_S:.0f} s after 'keys revoke'"
        _unauthorized(api, accounts.keys["revoked"])
        assert alice.get("/v1/model").status_code == 200, "revoking one key locked out another"
    assert accounts.server.alive() and accounts.server.pid == pid, "the server restarted"


def test_a_key_added_while_running_works_without_a_restart(accounts: Accounts) -> None:
    key = add_key(accounts.keys_file, "late")
    accounts.keys["late"] = key
    accounts.secrets.append(key)
    with accounts.api("late") as api:
        ok = wait_until(lambda: api.get("/v1/model").status_code == 200, RELOAD_S, 0.1)
        assert ok, f"a key added while the server runs does not work after {RELOAD_S:.0f} s"
    with accounts.api("alice") as alice:
        assert alice.get("/v1/model").status_code == 200


def _unauthorized_error() -> type[Exception]:
    cls = getattr(errors, "UnauthorizedError", None)
    assert cls is not None, "hooklab.errors has no UnauthorizedError"
    assert issubclass(cls, errors.ServerError)
    return cls


def test_the_client_sends_its_key(accounts: Accounts) -> None:
    model = accounts.connect("alice")
    tensor_id = model.store_tensor(torch.ones(4))
    with accounts.api("alice") as api:
        listed = {obj["id"]: obj for obj in api.get("/v1/tensors").json()["objects"]}
    assert listed[tensor_id].get("owner") == "alice"
    model.delete_stored(tensor_id)


def test_the_client_raises_unauthorized(accounts: Accounts) -> None:
    unauthorized = _unauthorized_error()
    wrong = f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"
    accounts.secrets.append(wrong)
    with pytest.raises(unauthorized) as caught:
        accounts.connect(None, api_key=wrong)
    assert caught.value.status == 401 and caught.value.code == "unauthorized"
    assert wrong not in str(caught.value)


def test_the_client_reads_hooklab_api_key(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    unauthorized = _unauthorized_error()
    monkeypatch.delenv("HOOKLAB_API_KEY", raising=False)
    with pytest.raises(unauthorized):
        accounts.connect(None, api_key=None)
    monkeypatch.setenv("HOOKLAB_API_KEY", accounts.keys["bob"])
    model = accounts.connect(None, api_key=None)
    tensor_id = model.store_tensor(torch.ones(4))
    with accounts.api("bob") as api:
        listed = {obj["id"]: obj for obj in api.get("/v1/tensors").json()["objects"]}
    assert listed.get(tensor_id, {}).get("owner") == "bob", "HOOKLAB_API_KEY was not used"
    model.delete_stored(tensor_id)
