"""Helpers shared by the benchmarks that talk to a real server: a gpt2-small-sized checkpoint,
``hooklab-server`` in its own process on a free loopback port, and interleaved timing."""

from __future__ import annotations

import gc
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.checkpoints import GPT2_SMALL, build_checkpoint, build_tokenizer  # noqa: E402

SEED = 0
SERVER_START_TIMEOUT_S = 300.0


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], runs: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each candidate, timed round-robin: each repetition runs every
    candidate once, starting with a different one each time (after ``warmup`` untimed rounds).
    Results are dropped before the next candidate runs."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
            gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(runs):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    gc.collect()
    return {name: statistics.median(values) for name, values in times.items()}


@contextmanager
def gpt2_small_checkpoint() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hooklab-bench-") as tmp:
        # A neutral folder name: TransformerLens 3.9 picks an architecture from path substrings.
        tokenizer_dir = Path(tmp) / "tok"
        build_tokenizer(tokenizer_dir)
        checkpoint = Path(tmp) / "ckpt-a"
        build_checkpoint("gpt2", checkpoint, seed=SEED, tokenizer_dir=tokenizer_dir, **GPT2_SMALL)
        yield checkpoint


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(script: str, module: str) -> list[str]:
    """The venv's console script ``script``, or ``python -m module`` where it is missing."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def server_command(checkpoint: Path, port: int, device: str = "cpu") -> list[str]:
    return [
        *launcher("hooklab-server", "hooklab_server.cli"),
        "--model", str(checkpoint), "--port", str(port), "--device", device,
    ]  # fmt: skip


@contextmanager
def running_process(
    command: list[str], log_path: Path, threads: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """``command`` in its own process, output to ``log_path``, ``threads`` OpenMP/MKL threads
    (``env``: extra settings); terminated (then killed after 15 s) on the way out."""
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    full_env = {**os.environ, **(env or {}), **threads_env}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    try:
        yield process
    finally:
        stop_process(process, timeout_s=15)


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL past ``timeout_s``; nothing when it has already exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(
    checkpoint: Path,
    log_path: Path,
    threads: int,
    device: str = "cpu",
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``hooklab-server`` in its own process on a free loopback port (``env``: extra
    ``HOOKLAB_*`` settings); yields (url, process) right after starting it — call
    :func:`wait_ready` before using it."""
    port = free_port()
    command = server_command(checkpoint, port, device)
    with running_process(command, log_path, threads, env) as process:
        yield f"http://127.0.0.1:{port}", process


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"hooklab-server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"hooklab-server did not become ready within {SERVER_START_TIMEOUT_S:.0f} s")


@contextmanager
def server_beside_tl(threads: int) -> Iterator[tuple[str, Any]]:
    """(server URL, TransformerLens model) on one gpt2-small-sized checkpoint: the server in its
    own process on a loopback port, TransformerLens 3.9 here."""
    from fixtures.oracle import load_tl_model

    with gpt2_small_checkpoint() as checkpoint, tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "server.log"
        with running_server(checkpoint, log, threads) as (url, process):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tl = load_tl_model(checkpoint)
            wait_ready(url, process, log)
            yield url, tl


@contextmanager
def served_beside_tl(threads: int) -> Iterator[tuple[Any, Any]]:
    """(hooklab client, TransformerLens model): :func:`server_beside_tl`, connected."""
    import hooklab

    with server_beside_tl(threads) as (url, tl):
        model = hooklab.connect(url, timeout=600)
        try:
            yield model, tl
        finally:
            model.close()
