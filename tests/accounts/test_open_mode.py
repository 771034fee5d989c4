"""Open mode only where it is safe (issue 9, contract9 "Keys").

* No keys and ``--host 0.0.0.0`` (with ``--allowed-hosts 127.0.0.1``, so that only the keys
  rule can refuse it): the server refuses to start — exit code 2, stderr mentions
  ``--insecure-open`` — and never serves.
* The same with ``--insecure-open``: it starts, logs a warning at start, serves without a key
  (``/v1/capabilities`` says auth is off) and labels its metrics ``key="open"``; then it is
  stopped.

These servers are launched here rather than with ``ServerProcess`` (which always binds
127.0.0.1); every request still goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from hostile.server_process import Metrics, free_port, server_executable

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 120.0
REFUSE_TIMEOUT_S = 60.0
WARNING = re.compile(r"(?i)insecure|without (api )?keys|no (api )?keys|anyone")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    for name in ("HOOKLAB_KEYS_FILE", "HOOKLAB_INSECURE_OPEN", "HOOKLAB_HOST", "HOOKLAB_API_KEY"):
        env.pop(name, None)
    return env


def _command(checkpoint: Path, port: int, *extra: str) -> list[str]:
    return [
        str(server_executable()), "--model", str(checkpoint), "--device", "cpu",
        "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts", "127.0.0.1", *extra,
    ]  # fmt: skip


def _ready(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url + "/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    return proc.returncode


def test_no_keys_on_a_non_loopback_address_refuses_to_start(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            _command(gpt2_checkpoint, port), stdout=stdout, stderr=stderr,
            stdin=subprocess.DEVNULL, env=_env(), start_new_session=True,
        )  # fmt: skip
    served = False
    try:
        deadline = time.monotonic() + REFUSE_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while proc.poll() is None and time.monotonic() < deadline:
                if _ready(client, url):
                    served = True
                    break
                time.sleep(0.1)
    finally:
        code = _stop(proc)
    stderr_text = err.read_text(errors="replace")
    assert not served, "without keys, on 0.0.0.0, the server started serving"
    assert code == 2, f"exit code {code}, expected 2; stderr:\n{stderr_text[-2000:]}"
    assert "--insecure-open" in stderr_text, (
        f"stderr does not mention --insecure-open:\n{stderr_text}"
    )


def test_insecure_open_starts_with_a_warning(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            _command(gpt2_checkpoint, port, "--insecure-open"), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
            start_new_session=True,
        )  # fmt: skip
    try:
        with httpx.Client(timeout=10.0) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _ready(client, url):
                assert proc.poll() is None, (
                    f"--insecure-open: the server exited ({proc.returncode}):\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}"
                )
                assert time.monotonic() < deadline, "--insecure-open: not ready in time"
                time.sleep(0.1)
            at_start = log_path.read_text(errors="replace")
            assert WARNING.search(at_start), f"no warning about open mode at start:\n{at_start}"

            assert client.get(url + "/v1/model").status_code == 200, "open mode needs no key"
            capabilities = client.get(url + "/v1/capabilities")
            assert capabilities.status_code == 200 and capabilities.json().get("auth") is False
            forward = client.post(
                url + "/v1/forward", json={"input": [[5, 6, 7, 8]]},
                headers={"accept": "application/json"},
            )  # fmt: skip
            assert forward.status_code == 200, forward.text[:300]
            metrics = Metrics(client.get(url + "/metrics").text)
            count = metrics.value(
                "hooklab_requests_total", route="/v1/forward", status="200", key="open"
            )
            assert count == 1, f'hooklab_requests_total{{key="open"}}: {count}'
    finally:
        _stop(proc)
