"""Scaled out over Redis (issue 11), with real parts: redis-server, ``hooklab-worker`` processes,
the API tier in uvicorn (and once as a ``hooklab-server --redis-url`` process), the real client.
References are TransformerLens 3.9 on the same weights.

* Two models served at once route correctly; a model with no live worker is 503.
* A worker killed (SIGKILL) in the middle of a patching sweep or a generation: the job completes
  on the other worker, or a stream that had already sent steps ends with a retryable error.
* redis-server restarted with AOF: stored tensors and caches survive; during the outage requests
  fail fast with 503, and they recover by themselves.
* redis-server restarted empty (no AOF): the workers make their stream, group and registration
  again, and requests recover by themselves.
* Two API processes behind one Redis share stored objects and quotas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
import transformer_lens.patching as tl_patching
from accounts.harness import add_key
from e2e.e2e_servers import sample_tokens, tl_model

import hooklab
from fixtures.redis_server import RedisServer, free_port, running_redis
from fixtures.scaled_out import TEST_LEASE_S, ScaledOut
from hooklab import metrics, patching
from hooklab_proto import tensor_from_json
from hooklab_server.remote.jobs import decode_job
from hooklab_server.remote.keys import GROUP, RedisKeys
from hooklab_server.settings import Settings

pytestmark = pytest.mark.slow

ATOL = 1e-4
ANSWER, WRONG = [5, 7], [9, 11]


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("scaled-redis")) as server:
        yield server


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def holder_of_job(deployment: ScaledOut, model: str, timeout_s: float = 30.0) -> int:
    """The pid of the worker holding the model's one pending job (worker ids end in the pid)."""
    client = redis.Redis.from_url(deployment.settings.redis_url)
    jobs = RedisKeys(deployment.settings.redis_prefix).jobs(model)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = client.xpending_range(jobs, GROUP, "-", "+", 10)
        if pending:
            consumer = pending[0]["consumer"].decode()
            return int(consumer.split("-")[-2])
        time.sleep(0.002)
    raise AssertionError("no worker took the job")


def wait_for_steps(deployment: ScaledOut, model: str, steps: int) -> None:
    """Until the model's one pending job has written ``steps`` result entries."""
    client = redis.Redis.from_url(deployment.settings.redis_url)
    keys = RedisKeys(deployment.settings.redis_prefix)
    pending = client.xpending_range(keys.jobs(model), GROUP, "-", "+", 1)
    entry_id = pending[0]["message_id"]
    [(_, fields)] = client.xrange(keys.jobs(model), entry_id, entry_id)
    results = keys.results(decode_job(fields[b"job"]).id)
    deadline = time.monotonic() + 30
    while client.xlen(results) < steps:
        assert time.monotonic() < deadline, "the job made no steps"
        time.sleep(0.001)


def stop_and_kill(deployment: ScaledOut, pid: int) -> None:
    """Freeze the worker at once (SIGSTOP: it sends nothing more), then SIGKILL it."""
    os.kill(pid, signal.SIGSTOP)
    worker = next(w for w in deployment.workers if w.process.pid == pid)
    worker.kill()


def kill_holder_mid_job(deployment: ScaledOut, model: str) -> None:
    """Freeze the worker holding the model's pending job and kill it — only once it is frozen
    while still holding a job: a sweep of short jobs may finish one between the look and the
    freeze, and then the next job's holder is taken instead."""
    client = redis.Redis.from_url(deployment.settings.redis_url)
    jobs = RedisKeys(deployment.settings.redis_prefix).jobs(model)
    while True:
        pid = holder_of_job(deployment, model)
        os.kill(pid, signal.SIGSTOP)
        held = client.xpending_range(jobs, GROUP, "-", "+", 10)
        if any(int(entry["consumer"].decode().split("-")[-2]) == pid for entry in held):
            stop_and_kill(deployment, pid)
            return
        os.kill(pid, signal.SIGCONT)


def taken_over(deployment: ScaledOut) -> bool:
    return any("taken over" in w.log.read_text() for w in deployment.workers)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# ---- several models --------------------------------------------------------------------------


def test_two_models_route_correctly_and_a_model_without_workers_is_503(
    module_redis: RedisServer, gpt2_checkpoint: Path, llama_checkpoint: Path, folder: Path
) -> None:
    deployment = ScaledOut(
        module_redis.url, [gpt2_checkpoint, llama_checkpoint], folder, workers=1
    ).start()
    try:
        listed = httpx.get(f"{deployment.url}/v1/models").json()["models"]
        names = [model["model_name"] for model in listed]
        assert sorted(names) == sorted([gpt2_checkpoint.name, llama_checkpoint.name])
        assert all(model["workers"] == 1 and model["hook_points"] for model in listed)
        tokens = sample_tokens(tl_model(gpt2_checkpoint), batch=2, pos=6)
        for checkpoint in (gpt2_checkpoint, llama_checkpoint):
            model = hooklab.connect(deployment.url, model=checkpoint.name)
            try:
                assert model.cfg.n_layers == tl_model(checkpoint).cfg.n_layers
                expected = tl_model(checkpoint)(tokens)
                torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=0)
            finally:
                model.close()
        default = hooklab.connect(deployment.url)  # no model: the first listed
        try:
            assert default.info["model_name"] == names[0]
        finally:
            default.close()

        missing = httpx.post(
            f"{deployment.url}/v1/forward", json={"model": "nope", "input": [[1, 2]]}
        )
        assert missing.status_code == 503 and error_of(missing)["code"] == "unavailable"
        assert "'nope'" in error_of(missing)["message"]
        assert gpt2_checkpoint.name in error_of(missing)["hint"]

        # The llama worker goes: its requests get 503 once its heartbeat runs out; gpt2 goes on.
        llama_worker = next(w for w in deployment.workers if w.checkpoint == llama_checkpoint)
        llama_worker.kill()
        deployment.wait_for_workers({llama_checkpoint.name: 0})
        body = {"model": llama_checkpoint.name, "input": [[1, 2, 3]]}
        gone = httpx.post(f"{deployment.url}/v1/forward", json=body)
        assert gone.status_code == 503 and error_of(gone)["code"] == "unavailable"
        assert gone.headers["retry-after"]
        body["model"] = gpt2_checkpoint.name
        assert httpx.post(f"{deployment.url}/v1/forward", json=body).status_code == 200
        # A new worker brings it back, with nothing else to do.
        deployment.add_worker(llama_checkpoint)
        deployment.wait_for_workers({llama_checkpoint.name: 1})
        body["model"] = llama_checkpoint.name
        assert httpx.post(f"{deployment.url}/v1/forward", json=body).status_code == 200
    finally:
        deployment.stop()


# ---- a worker dies mid-job ---------------------------------------------------------------------


@pytest.fixture
def pair(module_redis: RedisServer, gpt2_checkpoint: Path, folder: Path) -> Iterator[ScaledOut]:
    """gpt2 on two workers."""
    deployment = ScaledOut(module_redis.url, [gpt2_checkpoint], folder, workers=2).start()
    yield deployment
    deployment.stop()


def test_a_worker_killed_mid_patching_sweep_its_sweep_completes_on_the_other(
    pair: ScaledOut, gpt2_checkpoint: Path
) -> None:
    tl = tl_model(gpt2_checkpoint)
    # Long enough (256 forwards, one patch each) for the kill to land mid-sweep.
    clean = sample_tokens(tl, batch=4, pos=32, seed=1)
    corrupted = sample_tokens(tl, batch=4, pos=32, seed=2)

    answer, wrong = ANSWER * 2, WRONG * 2  # one per batch row

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0])
        return (logits[rows, -1, answer] - logits[rows, -1, wrong]).mean()

    _, tl_cache = tl.run_with_cache(clean)
    expected = tl_patching.get_act_patch_attn_head_out_by_pos(tl, corrupted, tl_cache, logit_diff)

    model = hooklab.connect(pair.url, timeout=120)
    try:
        _, cache = model.run_with_cache(clean, store=True)
        result: dict[str, Any] = {}

        def sweep() -> None:
            result["value"] = patching.generic_activation_patch(
                model, corrupted, cache, metrics.logit_diff(answer, wrong),
                patching.layer_pos_head_vector_patch_setter, "z", ["layer", "pos", "head"],
                progress=False, patches_per_forward=1,
            )  # fmt: skip

        thread = threading.Thread(target=sweep)
        started = time.monotonic()
        thread.start()
        kill_holder_mid_job(pair, gpt2_checkpoint.name)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the sweep hangs after its worker died"
        torch.testing.assert_close(result["value"], expected, atol=ATOL, rtol=0)
        assert taken_over(pair), "\n".join(w.log.read_text()[-1500:] for w in pair.workers)
        assert time.monotonic() - started < 10 * TEST_LEASE_S + 20
    finally:
        model.close()


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line[5:])


def test_a_worker_killed_mid_stream_gives_a_retryable_error_and_a_plain_generate_completes(
    pair: ScaledOut, gpt2_checkpoint: Path
) -> None:
    tl = tl_model(gpt2_checkpoint)
    prompt = sample_tokens(tl, batch=1, pos=8, seed=3)
    new = 110
    # Without the KV cache every step reruns the whole sequence: slow enough to kill mid-way.
    body = {"input": prompt.tolist(), "max_new_tokens": new, "stop_at_eos": False,
            "do_sample": False, "use_past_kv_cache": False, "stream": True}  # fmt: skip
    started = time.monotonic()
    events = []
    with httpx.stream("POST", f"{pair.url}/v1/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        for event, data in _events(response):
            if not events:  # the first token: freeze then kill the worker making them
                stop_and_kill(pair, holder_of_job(pair, gpt2_checkpoint.name))
            events.append((event, data))
    assert time.monotonic() - started < 30, "the stream hung after its worker died"
    last_event, last = events[-1]
    assert last_event == "error", f"the stream ended with {last_event}, not an error"
    assert last["error"]["code"] == "unavailable"
    assert "cannot be replayed" in last["error"]["message"]
    assert 1 <= len(events) - 1 < new

    # Without streaming nothing was sent yet: the other worker's answer is the whole one.
    pair.add_worker(gpt2_checkpoint)
    pair.wait_for_workers({gpt2_checkpoint.name: 2})
    body["stream"] = False
    answer: dict[str, Any] = {}

    def generate() -> None:
        answer["response"] = httpx.post(f"{pair.url}/v1/generate", json=body, timeout=60)

    thread = threading.Thread(target=generate)
    thread.start()
    holder = holder_of_job(pair, gpt2_checkpoint.name)
    wait_for_steps(pair, gpt2_checkpoint.name, 3)  # steps made, none sent to the client
    stop_and_kill(pair, holder)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the generation hangs after its worker died"
    response = answer["response"]
    assert response.status_code == 200, response.text
    expected = tl.generate(
        prompt, max_new_tokens=new, stop_at_eos=False, do_sample=False, verbose=False
    )
    assert response.json()["tokens"] == expected.tolist()


# ---- Redis restarts --------------------------------------------------------------------------


def test_stored_objects_survive_a_redis_restart_and_the_outage_is_503(
    tmp_path_factory: pytest.TempPathFactory, gpt2_checkpoint: Path, folder: Path
) -> None:
    redis_server = RedisServer(tmp_path_factory.mktemp("aof-redis"), aof=True).start()
    deployment = ScaledOut(redis_server.url, [gpt2_checkpoint], folder, workers=1)
    try:
        deployment.start()
        model = hooklab.connect(deployment.url)
        tokens = sample_tokens(tl_model(gpt2_checkpoint), batch=1, pos=5)
        vector = torch.randn(7, 3)
        tensor_id = model.store_tensor(vector)
        _, cache = model.run_with_cache(tokens, store=True)
        cache_id = cache.cache_id
        saved = {name: cache[name].clone() for name in cache}
        model.close()

        redis_server.stop()
        for method, path, body in [
            ("POST", "/v1/forward", {"input": [[1, 2, 3]]}),
            ("GET", f"/v1/tensors/{tensor_id}", None),
            ("GET", "/v1/caches", None),
        ]:
            asked = time.monotonic()
            response = httpx.request(method, f"{deployment.url}{path}", json=body, timeout=30)
            assert response.status_code == 503, (path, response.text)
            assert error_of(response)["code"] == "unavailable"
            assert "Redis" in error_of(response)["message"]
            assert time.monotonic() - asked < 5, f"{path} did not fail fast"
        assert httpx.get(f"{deployment.url}/readyz").status_code == 503

        redis_server.start()  # the same port and folder: the AOF is replayed
        deadline = time.monotonic() + 60
        while True:
            response = httpx.post(f"{deployment.url}/v1/forward", json={"input": [[1, 2, 3]]})
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, f"no recovery: {response.text}"
            time.sleep(0.2)
        model = hooklab.connect(deployment.url)
        try:
            got = httpx.get(
                f"{deployment.url}/v1/tensors/{tensor_id}", headers={"accept": "application/json"}
            ).json()["tensors"][tensor_id]
            assert torch.equal(tensor_from_json(got), vector)
            restored = httpx.get(
                f"{deployment.url}/v1/caches/{cache_id}", headers={"accept": "application/json"}
            ).json()["tensors"]
            assert set(restored) == set(saved)
            for name, value in saved.items():
                assert torch.equal(tensor_from_json(restored[name]), value)
        finally:
            model.close()
    finally:
        deployment.stop()
        redis_server.stop()


def test_workers_and_api_recover_from_a_redis_that_restarts_empty(
    tmp_path_factory: pytest.TempPathFactory, gpt2_checkpoint: Path, folder: Path
) -> None:
    """Without AOF a restarted Redis has lost the job stream, its consumer group and the model
    registrations: the workers make them again by themselves (what was stored is gone: 404)."""
    with running_redis(tmp_path_factory.mktemp("empty-redis")) as redis_server:
        deployment = ScaledOut(redis_server.url, [gpt2_checkpoint], folder, workers=1)
        try:
            deployment.start()
            tokens = sample_tokens(tl_model(gpt2_checkpoint), batch=1, pos=5)
            model = hooklab.connect(deployment.url)
            tensor_id = model.store_tensor(torch.ones(3))
            model.close()
            redis_server.stop()
            redis_server.start()  # empty: no AOF
            deadline = time.monotonic() + 60
            body = {"input": tokens.tolist()}
            while httpx.post(f"{deployment.url}/v1/forward", json=body).status_code != 200:
                assert time.monotonic() < deadline, "no recovery after an empty restart"
                time.sleep(0.2)
            model = hooklab.connect(deployment.url)
            try:
                expected = tl_model(gpt2_checkpoint)(tokens)
                torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=0)
                gone = httpx.get(f"{deployment.url}/v1/tensors/{tensor_id}")
                assert gone.status_code == 404
            finally:
                model.close()
        finally:
            deployment.stop()


# ---- two API processes -----------------------------------------------------------------------


def test_two_api_processes_share_stored_objects_and_quotas(
    module_redis: RedisServer, gpt2_checkpoint: Path, folder: Path
) -> None:
    keys_file = folder / "keys.json"
    key = add_key(keys_file, "alice", quota={"tokens_per_minute": 40})
    settings = Settings(keys_file=str(keys_file))
    deployment = ScaledOut(
        module_redis.url, [gpt2_checkpoint], folder, settings, workers=1, api_key=key
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        deployment.start()
        port = free_port()
        env = {
            **os.environ,
            "HOOKLAB_REDIS_URL": module_redis.url,
            "HOOKLAB_REDIS_PREFIX": deployment.settings.redis_prefix,
            "HOOKLAB_KEYS_FILE": str(keys_file),
        }
        log = (folder / "api-2.log").open("wb")
        second = subprocess.Popen(
            [sys.executable, "-m", "hooklab_server.cli", "--port", str(port)],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
        other = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{other}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (folder / "api-2.log").read_text()[-2000:]
            time.sleep(0.2)

        headers = {"authorization": f"Bearer {key}"}
        one = httpx.Client(base_url=deployment.url, headers=headers, timeout=30)
        two = httpx.Client(base_url=other, headers=headers, timeout=30)
        vector = [[1.5, -2.0], [0.25, 8.0]]
        stored = one.post("/v1/tensors", json={"tensor": {"dtype": "F32", "shape": [2, 2],
                                                           "data": vector}})  # fmt: skip
        assert stored.status_code == 201, stored.text
        read = two.get(f"/v1/tensors/{stored.json()['id']}", headers={"accept": "application/json"})
        assert read.json()["tensors"][stored.json()["id"]]["data"] == vector

        assert one.post("/v1/forward", json={"input": [list(range(3, 33))]}).status_code == 200
        assert two.get("/v1/usage").json()["usage"]["tokens_last_minute"] == 30
        over = two.post("/v1/forward", json={"input": [list(range(3, 14))]})  # 30 + 11 > 40
        assert over.status_code == 429 and error_of(over)["code"] == "quota"
        assert one.post("/v1/forward", json={"input": [list(range(3, 10))]}).status_code == 200
        # A generation's tokens are settled (prompt + generated) before its answer arrives.
        body = {"input": [[3, 4]], "max_new_tokens": 1, "stop_at_eos": False}
        assert two.post("/v1/generate", json=body).status_code == 200
        assert one.get("/v1/usage").json()["usage"]["tokens_last_minute"] == 40
        one.close()
        two.close()
    finally:
        if second is not None:
            second.terminate()
            second.wait(timeout=20)
        deployment.stop()
