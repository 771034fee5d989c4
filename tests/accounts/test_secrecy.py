"""A key never shows up (issue 9: "keys never appear in logs, metrics or error messages").

Runs after the other accounts tests (this file sorts last in the folder; the ``accounts`` server
is shared by the package), so it sees everything they did: every response body and header the
tests received (``Traffic``, recorded for raw httpx and the real client alike), the server's
whole log (stdout + stderr: uvicorn, the access log, warnings), a final ``/metrics`` scrape, the
keys file and the output of ``keys list`` / ``keys revoke``. None may contain a full key or its
secret part (what follows ``hl_``), nor any of the wrong keys the tests sent. It also makes a
few error-path requests of its own, so that run alone it still means something.
"""

from __future__ import annotations

import secrets

import pytest

from .harness import KEY_PREFIX, Accounts, keys_cli

pytestmark = pytest.mark.slow

MIN_NEEDLE = 12  # shorter strings ("Bearer", "hl_") are not secrets


def _error_paths(accounts: Accounts) -> None:
    """Requests whose answers are most likely to echo a key: 401s, 404s, 422s, 429s."""
    wrong = f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"
    accounts.secrets.append(wrong)
    for authorization in (f"Bearer {wrong}", wrong, f"Bearer {accounts.keys['alice']}x"):
        accounts.secrets.append(authorization.split()[-1])
        with accounts.raw(authorization) as api:
            api.get("/v1/model")
            api.post("/v1/forward", json={"input": [[5, 6, 7]]})
            api.get("/v1/usage")
    with accounts.api("revoked") as api:  # revoked by test_auth, or still valid when run alone
        api.get("/v1/model")
    with accounts.api("alice") as api:
        api.get("/v1/tensors/t_0123456789abcdef")
        api.post("/v1/forward", json={"input": [[5, 6, 7]], "no_such_field": 1})
        api.post("/v1/forward", content=b"{not json", headers={"content-type": "application/json"})
        api.get("/v1/usage")
    with accounts.api("newtok") as api:
        api.post("/v1/generate", json={"input": [[5, 6]], "max_new_tokens": 50})
    with accounts.api("root") as api:
        api.get("/v1/usage")
        api.get("/v1/tensors")
        api.get("/v1/caches")


def test_no_key_appears_in_any_response_log_or_metric(accounts: Accounts) -> None:
    _error_paths(accounts)
    with accounts.api(None, accept="text/plain") as api:
        metrics = api.get("/metrics").text  # recorded in the traffic as well
    listed = keys_cli(accounts.keys_file, "list")
    accounts.traffic.add("keys list (stdout+stderr)", listed.stdout + listed.stderr)
    log = accounts.server.log_text()
    keys_file = accounts.keys_file.read_text(errors="replace")
    assert len(accounts.traffic) > 20, "too little was recorded for this check to mean much"
    assert "key=alice" in log or "alice" in metrics, "the log and metrics name no key at all"

    needles: dict[str, str] = {}
    for name, key in accounts.keys.items():
        needles[key] = f"{name}'s key"
        needles[key[len(KEY_PREFIX) :]] = f"{name}'s key without its prefix"
    for sent in accounts.secrets:
        if len(sent) >= MIN_NEEDLE:
            needles.setdefault(sent, "a wrong key the tests sent")

    leaks = []
    for needle, what in needles.items():
        leaks += [
            f"{what} in the response {where}" for where in accounts.traffic.containing(needle)
        ]
        if needle in log:
            at = log.index(needle)
            leaks.append(f"{what} in the server log: …{log[max(0, at - 80) : at + 20]}…")
        if needle in metrics:
            leaks.append(f"{what} in /metrics")
        if needle in keys_file:
            leaks.append(f"{what} in the keys file (only a hash may be stored)")
    assert not leaks, f"{len(leaks)} key leak(s):\n" + "\n".join(leaks[:40])
