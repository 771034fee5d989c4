"""A real ``hooklab-server`` subprocess for the hostile tests, and helpers to watch it.

Unlike ``tests/e2e/e2e_servers.py`` (uvicorn in a thread of the test process), the server here is
its own process: its memory (``VmRSS``), CPU and logs are the server's alone, a runaway request
cannot slow the test process, and a crash is visible as an exit code.

* ``ServerProcess`` / ``server_process``: ``.venv/bin/hooklab-server --model <checkpoint> --host
  127.0.0.1 --port <free>`` plus any flags and ``HOOKLAB_*`` variables (issue 8's contract: every
  setting is both); ready when ``GET /readyz`` answers 200; stopped with SIGTERM, then SIGKILL.
  stdout+stderr go to a log file, shown when the server fails to start.
* ``Metrics``: a parsed ``/metrics`` (Prometheus text), ``value(name, **labels)``.
* ``rss_bytes(pid)``: the process's resident set from ``/proc/<pid>/status``; ``cpu_seconds(pid)``
  its CPU time; ``ServerProcess.wait_idle()`` waits until it stops burning CPU (work a failed test
  left running must not leak into the next one's timings, counters or memory).

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # model load + imports; a cold torch import alone takes several seconds
STOP_TIMEOUT_S = 15.0


def server_executable() -> Path:
    """``hooklab-server`` next to the interpreter running the tests (the project's .venv)."""
    path = Path(sys.executable).parent / "hooklab-server"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the server (make test bootstraps it)")
    return path


def free_port() -> int:
    """A loopback port free right now (a tiny race with other processes is possible)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc/<pid>/status``), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match.group(1)) * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), from ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime, stime: 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- /metrics ----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Metrics:
    """Samples of one ``/metrics`` scrape: (name, sorted label pairs) -> value."""

    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
    text: str = field(repr=False, default="")

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                raise ValueError(f"not a Prometheus sample line: {line!r}")
            name, labels, value = match.groups()
            pairs = tuple(sorted(_LABEL.findall(labels or "")))
            samples[(name, pairs)] = float(value)
        return cls(samples, text)

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples

    def get(self, name: str, **labels: str) -> float | None:
        """The sample ``name{labels}`` (exact label set), None when absent."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        """The sample ``name{labels}`` (exact label set). Missing: ``default``, or AssertionError
        naming what is there when no default is given."""
        key = (name, tuple(sorted(labels.items())))
        if key in self.samples:
            return self.samples[key]
        if default is not None:
            return default
        present = sorted({n for n, _ in self.samples})
        raise AssertionError(
            f"/metrics has no sample {name}{labels or ''}; metric names present: {present}"
        )

    def total(self, name: str) -> float:
        """Sum of ``name`` over all label sets (0 when absent)."""
        return sum(v for (n, _), v in self.samples.items() if n == name)


# ---- the server process ------------------------------------------------------------------------


class ServerProcess:
    """``hooklab-server`` as a subprocess on a free loopback port."""

    def __init__(
        self,
        checkpoint: Path,
        log_path: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = [
            str(server_executable()),
            "--model",
            str(self.checkpoint),
            "--host",
            HOST,
            "--port",
            str(self.port),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        # Offline, quiet, and no thread oversubscription surprises from the test's own settings.
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # our own process group: a ^C of pytest does not reach it
        )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"hooklab-server exited with {self.proc.returncode} before it was "
                        f"ready:\n{' '.join(self.command)}\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"hooklab-server not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_text()
        return text[-chars:] if len(text) > chars else text

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_idle(
        self, timeout_s: float = 60.0, window_s: float = 0.25, max_busy: float = 0.15
    ) -> float:
        """Wait until the server used less than ``max_busy`` of one core over two consecutive
        ``window_s`` windows; returns the seconds waited. AssertionError after ``timeout_s``."""
        started = time.monotonic()
        quiet = 0
        last = cpu_seconds(self.pid)
        while quiet < 2:
            time.sleep(window_s)
            now = cpu_seconds(self.pid)
            quiet = quiet + 1 if now - last < max_busy * window_s else 0
            last = now
            if time.monotonic() - started > timeout_s:
                raise AssertionError(
                    f"the server is still busy after {timeout_s:.0f} s (work left running?)"
                )
        return time.monotonic() - started

    def metrics(self, client: httpx.Client | None = None) -> Metrics:
        if client is None:
            with httpx.Client(timeout=5.0) as own:
                return self.metrics(own)
        response = client.get(self.url + "/metrics")
        assert response.status_code == 200, f"/metrics: {response.status_code} {response.text}"
        return Metrics.parse(response.text)

    def healthz_seconds(self, timeout_s: float = 5.0) -> float:
        """Seconds ``GET /healthz`` took (a fresh connection); ``math.inf`` when it failed or
        timed out."""
        started = time.perf_counter()
        try:
            with httpx.Client(timeout=timeout_s) as client:
                response = client.get(self.url + "/healthz")
        except httpx.HTTPError:
            return math.inf
        if response.status_code != 200 or response.json() != {"status": "ok"}:
            return math.inf
        return time.perf_counter() - started


@contextlib.contextmanager
def server_process(
    checkpoint: Path,
    log_path: Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ServerProcess]:
    server = ServerProcess(checkpoint, log_path, args, env).start()
    try:
        yield server
    finally:
        server.stop()
