"""A real ``hooklab-server`` subprocess for the hostile tests, and the outside views of it they
need.

Unlike ``tests/e2e/e2e_servers.py`` (uvicorn in a thread of the test process), the server here is
its own process: its memory, CPU and log are the server's alone, a runaway request cannot slow
the test process, and a crash is visible as an exit code.

* ``ServerProcess`` / ``server_process``: ``hooklab-server --model <checkpoint> --host 127.0.0.1
  --port <free> --<setting> <value> …`` (the contract: every Settings field is a
  ``--field-name`` flag and a ``HOOKLAB_FIELD_NAME`` variable), stdout and stderr in one log
  file; ready when ``GET /readyz`` answers 200; stopped with SIGTERM, then SIGKILL;
  ``ensure_running`` restarts it when a request killed it.
* Reading it from outside: ``log_size`` / ``log_text(offset)`` / ``log_tail``; ``metrics()``
  (a parsed ``GET /metrics``, ``Metrics.value(name, **labels)``); ``healthz_seconds``;
  ``/proc``: ``rss_bytes`` (``VmRSS``), ``reset_peak`` / ``peak_bytes`` (``VmHWM``),
  ``cpu_seconds`` and ``wait_idle`` (work a failed test left running must not leak into the next
  one's timings, counters or memory), ``held_client_ports`` (its open TCP connections);
  ``raw_socket`` for the connection-edge tests (half-sent headers and bodies, slow readers,
  aborted uploads).
* ``HealthPoller``: a thread that asks ``GET /healthz`` every 100 ms while a hostile request runs
  and records each answer's latency (and the server's RSS at that moment).

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
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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


# ---- /metrics ----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


class Metrics:
    """One ``/metrics`` scrape (Prometheus text): its ``text`` and its samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                raise ValueError(f"not a Prometheus sample line: {line!r}")
            name, labels, value = match.groups()
            self.samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` whose labels include ``labels`` (with all of a
        metric's labels given: its one sample); None when no sample matches."""
        found = [
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name
            and all(sample_labels.get(key) == want for key, want in labels.items())
        ]
        return sum(found) if found else None


# ---- the server process ------------------------------------------------------------------------


class ServerProcess:
    """``hooklab-server`` on 127.0.0.1:<free port> with ``settings`` (Settings field -> value)
    as flags, plus ``env`` (extra environment variables).

    A CLI that refuses the flags (an argparse usage error: an older CLI without them, or without
    byte suffixes) gets the same settings as ``HOOKLAB_*`` environment variables instead, so the
    harness still runs against an older server (which then ignores most of them).
    """

    def __init__(
        self,
        checkpoint: Path,
        log_path: Path,
        settings: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.log_path = Path(log_path)
        self.settings = dict(settings or {})
        self.env = {**os.environ, **(env or {})}
        # Offline, quiet, and no thread oversubscription surprises from the test's own settings.
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.via_env = False
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    # --- life cycle -----------------------------------------------------------------------------

    def _launch(self, use_env: bool) -> None:
        self.port = free_port()
        cmd = [
            str(server_executable()), "--model", str(self.checkpoint),
            "--host", HOST, "--port", str(self.port),
        ]  # fmt: skip
        env = dict(self.env)
        for name, value in self.settings.items():
            if use_env:
                env["HOOKLAB_" + name.upper()] = value
            else:
                cmd += ["--" + name.replace("_", "-"), value]
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== harness: start #{self.starts} on port {self.port} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # our own process group: a ^C of pytest does not reach it
            )

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    return False
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        return False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        offset = self.log_size()
        self._launch(use_env=self.via_env)
        if self._wait_ready(timeout_s):
            return self
        if (
            not self.via_env
            and not self.alive()
            and "usage: hooklab-server" in self.log_text(offset)
        ):
            self.via_env = True  # an older CLI: the same settings through the environment
            print(
                "hostile harness: hooklab-server does not take the settings as flags yet; "
                "passing them as HOOKLAB_* environment variables",
                file=sys.stderr,
            )
            self._launch(use_env=True)
            if self._wait_ready(timeout_s):
                return self
        why = f"not ready after {timeout_s:.0f} s" if self.alive() else "exited before it was ready"
        code = self.stop()
        raise RuntimeError(f"hooklab-server {why} (exit code {code}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> str | None:
        """Restart the server if a request killed it; says so (None when it was alive)."""
        if self.alive():
            return None
        code = self.proc.returncode if self.proc is not None else None
        self.start()
        return f"the server had exited (code {code}) and was restarted"

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
        return self.proc.returncode

    # --- the log (stdout and stderr) ------------------------------------------------------------

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, offset: int = 0) -> str:
        """The log from byte ``offset`` on (``log_size()`` taken earlier: what came since)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- HTTP -----------------------------------------------------------------------------------

    def metrics(self, client: httpx.Client | None = None) -> Metrics:
        if client is None:
            with httpx.Client(timeout=10.0) as own:
                return self.metrics(own)
        response = client.get(self.url + "/metrics")
        assert response.status_code == 200, f"/metrics: {response.status_code} {response.text}"
        return Metrics(response.text)

    def healthz(self, client: httpx.Client, timeout_s: float) -> tuple[float, str | None]:
        """One ``GET /healthz`` on ``client``: seconds, and what was wrong (None: ``200
        {"status": "ok"}``). A failed request counts as at least ``timeout_s``."""
        started = time.monotonic()
        try:
            response = client.get(self.url + "/healthz", timeout=timeout_s)
            elapsed = time.monotonic() - started
            if response.status_code != 200 or response.json() != {"status": "ok"}:
                return elapsed, f"{response.status_code} {response.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            return max(time.monotonic() - started, timeout_s), f"{type(exc).__name__}: {exc}"
        return elapsed, None

    def healthz_seconds(self, timeout_s: float = 5.0) -> float:
        """Seconds ``GET /healthz`` took (a fresh connection); ``math.inf`` when it failed or
        timed out."""
        with httpx.Client() as client:
            seconds, problem = self.healthz(client, timeout_s)
        return math.inf if problem else seconds

    def raw_socket(self, rcvbuf: int | None = None, timeout_s: float = 5.0) -> socket.socket:
        """A fresh loopback TCP connection to the server."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout_s)
        sock.connect((HOST, self.port))
        return sock

    # --- /proc ----------------------------------------------------------------------------------

    def _status_kb(self, key: str) -> int | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def rss_bytes(self) -> int | None:
        """``VmRSS``: resident memory now (None once the process is gone)."""
        kb = self._status_kb("VmRSS")
        return None if kb is None else kb * 1024

    def reset_peak(self) -> bool:
        """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False when not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak_bytes(self) -> int | None:
        """``VmHWM``: the peak resident memory since the last ``reset_peak``."""
        kb = self._status_kb("VmHWM")
        return None if kb is None else kb * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server (all its threads), from ``/proc/<pid>/stat``."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime, stime: 14, 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_idle(
        self, timeout_s: float = 60.0, window_s: float = 0.25, max_busy: float = 0.15
    ) -> float:
        """Wait until the server used less than ``max_busy`` of one core over two consecutive
        ``window_s`` windows; returns the seconds waited. AssertionError after ``timeout_s``."""
        started = time.monotonic()
        quiet = 0
        last = self.cpu_seconds()
        while quiet < 2:
            time.sleep(window_s)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - last < max_busy * window_s else 0
            last = now
            if time.monotonic() - started > timeout_s:
                raise AssertionError(
                    f"the server is still busy after {timeout_s:.0f} s (work left running?)"
                )
        return time.monotonic() - started

    def held_client_ports(self) -> set[int]:
        """Remote (client) ports of the TCP connections this server process still holds open."""
        mine = set()
        with contextlib.suppress(OSError):
            for entry in Path(f"/proc/{self.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(entry)
                    if target.startswith("socket:["):
                        mine.add(int(target[8:-1]))
        ports = set()
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], int(parts[9])
                if inode in mine and int(local.rsplit(":", 1)[1], 16) == self.port:
                    ports.add(int(remote.rsplit(":", 1)[1], 16))
        return ports


@contextlib.contextmanager
def server_process(
    checkpoint: Path,
    log_path: Path,
    settings: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """A started ``ServerProcess``, stopped at the end of the block."""
    server = ServerProcess(checkpoint, log_path, settings, env).start()
    try:
        yield server
    finally:
        server.stop()


class HealthPoller(threading.Thread):
    """``GET /healthz`` every ``interval_s`` while a request runs: each answer's latency (a
    failure or a timeout counts as ``timeout_s``) and the server's RSS at each poll."""

    def __init__(
        self, server: ServerProcess, interval_s: float = 0.1, timeout_s: float = 5.0
    ) -> None:
        super().__init__(daemon=True, name="healthz-poller")
        self.server = server
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.max_rss = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client() as client:
            while not self._stop_event.is_set():
                started = time.monotonic()
                elapsed, problem = self.server.healthz(client, self.timeout_s)
                if problem:
                    self.failures.append(problem)
                self.latencies.append(elapsed)
                rss = self.server.rss_bytes()
                if rss is not None:
                    self.max_rss = max(self.max_rss, rss)
                self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    @property
    def worst_s(self) -> float:
        return max(self.latencies, default=0.0)

    def __enter__(self) -> HealthPoller:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout_s + 2)
