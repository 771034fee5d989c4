"""Observability (issue 9, contract9 "Observability"): /metrics, /readyz, /v1/capabilities and
the access log of the keyed server.

* ``/metrics`` (Prometheus text) declares every series of the contract (issue 9's and issue 8's);
  after 3 forwards by alice and 2 by bob, ``hooklab_requests_total{route,status,key}`` grew by
  exactly 3 and 2 under their key *names*, ``hooklab_tokens_total{key}`` by the prompt tokens,
  ``hooklab_response_bytes_total{key}`` by at least the bodies sent; the latency histogram
  ``hooklab_request_seconds{route}`` counted all 5 in cumulative buckets;
  ``hooklab_stored_bytes{key}`` follows a store and a delete (and agrees with ``/v1/usage``);
  ``hooklab_queue_depth`` / ``hooklab_running_jobs`` are 0 when idle.
* ``/readyz`` 200 ``{"status": "ready"}``; ``/healthz`` ``{"status": "ok"}``.
* ``GET /v1/capabilities`` (open): auth on, the model, limits, the default quotas, ops, spec ops,
  dtypes.
* The access log: exactly one line per request (``key=NAME method route status tokens bytes ms
  id``), with the right key name, status, token count and request id, 401s included.
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from hostile.server_process import Metrics

from .harness import Accounts, access_lines, json_tensor, wait_until

pytestmark = pytest.mark.slow

SPEC_OPS = {"ablate", "patch", "steer", "scale", "clamp", "set", "project_out"}
SERIES = (
    # issue 9
    "hooklab_requests_total", "hooklab_request_seconds", "hooklab_tokens_total",
    "hooklab_response_bytes_total", "hooklab_stored_bytes", "hooklab_queue_depth",
    "hooklab_running_jobs",
    # issue 8
    "hooklab_cancelled_total", "hooklab_work_units_total", "hooklab_inflight_requests",
    "hooklab_inflight_bytes", "hooklab_generations_started_total",
    "hooklab_generations_finished_total", "hooklab_generations_failed_total",
    "hooklab_generations_cancelled_total", "hooklab_generated_tokens_total",
    "hooklab_client_disconnects_total", "hooklab_body_timeouts_total",
    "hooklab_write_timeouts_total",
)  # fmt: skip


def ids(batch: int, pos: int, seed: int = 0) -> list[list[int]]:
    return [
        [(seed * 31 + row * 7 + col * 13) % 997 + 3 for col in range(pos)] for row in range(batch)
    ]


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.value(name, **labels) or 0.0


def _declared(text: str, name: str) -> bool:
    base = name.removesuffix("_total")
    return bool(
        re.search(rf"^# TYPE ({re.escape(name)}|{re.escape(base)}) ", text, re.MULTILINE)
        or re.search(rf"^{re.escape(name)}[{{ ]", text, re.MULTILINE)
    )


def test_readyz_and_healthz(accounts: Accounts) -> None:
    with accounts.api(None) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 200 and ready.json().get("status") == "ready", ready.text
        health = api.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}, health.text


def test_capabilities(accounts: Accounts) -> None:
    for name in (None, "alice"):  # open, and the same with a key
        with accounts.api(name) as api:
            response = api.get("/v1/capabilities")
        assert response.status_code == 200, f"key {name}: {response.status_code} {response.text}"
        body = response.json()
        assert body.get("auth") is True, body
        assert isinstance(body.get("model"), str) and body["model"], body
        limits = body.get("limits")
        assert isinstance(limits, dict) and limits, body
        assert all(isinstance(v, int | float) for v in limits.values()), limits
        assert body.get("quotas") == accounts.defaults, (
            f"capabilities quotas should be the server defaults {accounts.defaults}: "
            f"{body.get('quotas')}"
        )
        ops = body.get("ops")
        assert isinstance(ops, list) and all(isinstance(op, str) for op in ops), body
        assert {"/v1/forward", "forward"} & set(ops), f"ops lack forward: {ops}"
        assert {"/v1/generate", "generate"} & set(ops), f"ops lack generate: {ops}"
        assert set(body.get("spec_ops", [])) >= SPEC_OPS, body.get("spec_ops")
        dtypes = body.get("dtypes")
        assert isinstance(dtypes, list) and dtypes and all(isinstance(d, str) for d in dtypes)


def test_metrics_declares_every_series_of_the_contract(accounts: Accounts) -> None:
    with accounts.api("alice") as api:  # at least one request of each kind of series
        assert api.post("/v1/forward", json={"input": ids(1, 8)}).status_code == 200
    text = accounts.metrics().text
    missing = [name for name in SERIES if not _declared(text, name)]
    assert not missing, f"/metrics lacks {missing}"
    metrics = Metrics(text)
    assert _value(metrics, "hooklab_queue_depth") == 0, "queue depth when idle"
    assert _value(metrics, "hooklab_running_jobs") == 0, "running jobs when idle"


def test_per_key_request_token_and_byte_counters(accounts: Accounts) -> None:
    before = accounts.metrics()
    sent: dict[str, int] = {"alice": 0, "bob": 0}
    for name, count in (("alice", 3), ("bob", 2)):
        with accounts.api(name) as api:
            for index in range(count):
                response = api.post("/v1/forward", json={"input": ids(1, 8, seed=index)})
                assert response.status_code == 200, response.text[:300]
                sent[name] += len(response.content)
    after = accounts.metrics()
    for name, count in (("alice", 3), ("bob", 2)):
        labels = {"route": "/v1/forward", "status": "200", "key": name}
        grew = _value(after, "hooklab_requests_total", **labels) - _value(
            before, "hooklab_requests_total", **labels
        )
        assert grew == count, f"hooklab_requests_total{labels} grew by {grew}, not {count}"
        tokens = _value(after, "hooklab_tokens_total", key=name) - _value(
            before, "hooklab_tokens_total", key=name
        )
        assert tokens == 8 * count, f"hooklab_tokens_total{{key={name}}} grew by {tokens}"
        sent_bytes = _value(after, "hooklab_response_bytes_total", key=name) - _value(
            before, "hooklab_response_bytes_total", key=name
        )
        assert sent[name] <= sent_bytes <= sent[name] + 4096 * count, (
            f"hooklab_response_bytes_total{{key={name}}} grew by {sent_bytes}; the bodies were "
            f"{sent[name]} bytes"
        )


def test_request_latency_histogram_by_route(accounts: Accounts) -> None:
    before = accounts.metrics()
    with accounts.api("alice") as api:
        for index in range(5):
            assert api.post("/v1/forward", json={"input": ids(1, 8, seed=index)}).status_code == 200
    after = accounts.metrics()
    route = {"route": "/v1/forward"}
    for suffix in ("_count", "_bucket"):
        labels = {**route, "le": "+Inf"} if suffix == "_bucket" else route
        grew = _value(after, "hooklab_request_seconds" + suffix, **labels) - _value(
            before, "hooklab_request_seconds" + suffix, **labels
        )
        assert grew == 5, f"hooklab_request_seconds{suffix}{labels} grew by {grew}, not 5"
    assert _value(after, "hooklab_request_seconds_sum", **route) > _value(
        before, "hooklab_request_seconds_sum", **route
    )
    buckets = sorted(
        (float(labels["le"]), value)
        for name, labels, value in after.samples
        if name == "hooklab_request_seconds_bucket" and labels.get("route") == "/v1/forward"
    )
    assert len(buckets) >= 5, f"too few latency buckets: {buckets}"
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
    routes = {
        labels.get("route")
        for name, labels, _ in after.samples
        if name == "hooklab_request_seconds_count"
    }
    assert "/v1/forward" in routes and len(routes) >= 2, f"latency by route: {routes}"


def test_stored_bytes_gauge_per_key(accounts: Accounts) -> None:
    before = _value(accounts.metrics(), "hooklab_stored_bytes", key="bob")
    with accounts.api("bob") as api:
        response = api.post("/v1/tensors", json={"tensor": json_tensor(torch.zeros(256))})
        assert response.status_code == 201, response.text
        object_id = response.json()["id"]
        stored = _value(accounts.metrics(), "hooklab_stored_bytes", key="bob")
        assert 1024 <= stored - before <= 1024 + 4096, (before, stored)
        usage = api.get("/v1/usage").json()["usage"]["stored_bytes"]
        assert usage == stored, f"/v1/usage says {usage} stored bytes, /metrics {stored}"
        assert api.delete(f"/v1/tensors/{object_id}").status_code == 204
    assert _value(accounts.metrics(), "hooklab_stored_bytes", key="bob") == before


def test_access_log_has_one_line_per_request(accounts: Accounts) -> None:
    server = accounts.server
    offset = server.log_size()
    made: list[tuple[str | None, httpx.Response, int]] = []  # (key name, response, tokens)
    generate = {"input": [[5, 6, 7, 8]], "max_new_tokens": 3, "stop_at_eos": False,
                "do_sample": False}  # fmt: skip
    with (
        accounts.api("alice") as alice,
        accounts.api("bob") as bob,
        accounts.api("root") as root,
        accounts.api(None) as nobody,
    ):
        made.append(("alice", alice.post("/v1/forward", json={"input": ids(1, 8)}), 8))
        made.append(("alice", alice.post("/v1/generate", json=generate), 7))
        made.append(("bob", bob.get("/v1/tensors/t_0123456789abcdef"), 0))
        made.append((None, nobody.get("/v1/model"), 0))
        made.append(("root", root.get("/v1/usage"), 0))
    expected_status = [200, 200, 404, 401, 200]
    assert [r.status_code for _, r, _ in made] == expected_status, [
        (r.status_code, r.text[:200]) for _, r, _ in made
    ]
    request_ids = [response.headers["x-request-id"] for _, response, _ in made]

    def logged() -> list[dict[str, str]]:
        lines = access_lines(server.log_text(offset))
        return lines if all(any(line["id"] == rid for line in lines) for rid in request_ids) else []

    every = wait_until(logged, 3.0, 0.1) or access_lines(server.log_text(offset))
    window = "\n".join(line["_line"] for line in every) or server.log_text(offset)[-3000:]
    # Probes (the harness's /readyz) may log lines of their own meanwhile: count ours.
    lines = [line for line in every if line["id"] in request_ids]
    assert len(lines) == len(made), (
        f"{len(made)} requests made, {len(lines)} access-log lines for them:\n{window}"
    )
    names = set(accounts.keys)
    for (name, response, tokens), request_id in zip(made, request_ids, strict=True):
        mine = [line for line in lines if line["id"] == request_id]
        assert len(mine) == 1, f"{len(mine)} access lines for request {request_id}:\n{window}"
        line = mine[0]
        request = response.request
        if name is None:
            assert line["key"] not in names, line["_line"]
        else:
            assert line["key"] == name, line["_line"]
        assert line["method"] == request.method, line["_line"]
        path = request.url.path
        if response.status_code != 401:  # refused before routing: the route may be a placeholder
            routes = (path, re.sub(r"t_[0-9a-f]+$", "{object_id}", path))
            assert line["route"] in routes, line["_line"]
        assert int(line["status"]) == response.status_code, line["_line"]
        assert int(line["tokens"]) == tokens, line["_line"]
        size = len(response.content)
        assert size <= int(line["bytes"]) <= size + 2048, (size, line["_line"])
        assert 0 <= float(line["ms"]) < 60_000, line["_line"]
