"""A real ``hooklab-server`` subprocess and the outside views of it the hostile tests need.

* ``ServerProcess``: starts ``hooklab-server --model … --host 127.0.0.1 --port <free> --<flag> …``
  with stdout/stderr in files, waits for ``GET /readyz``, stops it with SIGTERM (SIGKILL after a
  timeout), restarts it when a request killed it, and reads its memory (``VmRSS``/``VmHWM`` from
  ``/proc/<pid>/status``) and its open sockets (``/proc/<pid>/fd`` against ``/proc/<pid>/net/tcp``).
* ``HealthPoller``: a thread that asks ``GET /healthz`` every 100 ms and records how long each
  answer took (and the server's RSS at that moment) while a hostile request runs.
* ``metric_sum``: reads one family from the Prometheus text of ``GET /metrics``.
* ``raw_socket``: a loopback TCP connection for the edge tests (half-sent headers and bodies, slow
  readers, aborted uploads).

Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LOOPBACK = "127.0.0.1"
SERVER_SCRIPT = Path(sys.executable).parent / "hooklab-server"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def flag_args(settings: dict[str, str]) -> list[str]:
    args: list[str] = []
    for name, value in settings.items():
        args += ["--" + name.replace("_", "-"), value]
    return args


def env_vars(settings: dict[str, str]) -> dict[str, str]:
    return {"HOOKLAB_" + name.upper(): value for name, value in settings.items()}


@dataclass
class ServerProcess:
    """``hooklab-server`` on 127.0.0.1:<free port> with ``settings`` (Settings field -> value).

    The settings go in as flags (the contract: every Settings field is a ``--field-name`` flag).
    A CLI that refuses them (an argparse usage error: an older CLI without these flags, or
    without byte suffixes) gets the same settings as ``HOOKLAB_*`` environment variables
    instead, so the harness still runs against an older server (which then ignores most of
    them: its rows fail on the limits, not on start-up).
    """

    checkpoint: Path
    settings: dict[str, str]
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    via_env: bool = False
    starts: int = 0
    stderr_path: Path = field(init=False)
    stdout_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.log_dir / "server.stderr.log"
        self.stdout_path = self.log_dir / "server.stdout.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- life cycle ------------------------------------------------------------------------

    def _launch(self, use_env: bool) -> None:
        self.port = free_port()
        cmd = [
            str(SERVER_SCRIPT), "--model", str(self.checkpoint),
            "--host", LOOPBACK, "--port", str(self.port),
        ]  # fmt: skip
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if use_env:
            env.update(env_vars(self.settings))
        else:
            cmd += flag_args(self.settings)
        self.starts += 1
        with (
            self.stderr_path.open("ab") as stderr,
            self.stdout_path.open("ab") as stdout,
        ):
            marker = f"\n=== hostile harness: start #{self.starts} on port {self.port} ===\n"
            stderr.write(marker.encode())
            stderr.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env
            )

    def start(self) -> ServerProcess:
        offset = self.stderr_size()
        self._launch(use_env=self.via_env)
        if self._wait_ready():
            return self
        if (
            not self.via_env
            and not self.alive()
            and "usage: hooklab-server" in self.stderr_text(offset)
        ):
            self.via_env = True  # an older CLI: the same settings through the environment
            print(
                "hostile harness: hooklab-server does not take the settings as flags yet; "
                "passing them as HOOKLAB_* environment variables",
                file=sys.stderr,
            )
            self._launch(use_env=True)
            if self._wait_ready():
                return self
        self.stop()
        raise RuntimeError(f"hooklab-server did not become ready:\n{self.stderr_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> str | None:
        """Restart the server if a request killed it; says so (None when it was alive)."""
        if self.alive():
            return None
        code = self.proc.returncode if self.proc is not None else None
        self.start()
        return f"the server had exited (code {code}) and was restarted"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    # --- logs ------------------------------------------------------------------------------

    def stderr_size(self) -> int:
        return self.stderr_path.stat().st_size if self.stderr_path.exists() else 0

    def stderr_text(self, offset: int = 0) -> str:
        if not self.stderr_path.exists():
            return ""
        with self.stderr_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def stderr_tail(self, lines: int = 40) -> str:
        text = self.stderr_text()
        return "\n".join(text.splitlines()[-lines:])

    # --- /proc -----------------------------------------------------------------------------

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

    def socket_inodes(self) -> set[int]:
        inodes = set()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            return inodes
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        return inodes

    def held_client_ports(self) -> set[int]:
        """Remote (client) ports of the TCP connections this server process still holds open."""
        mine = self.socket_inodes()
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
        with httpx.Client(base_url=self.server.url, timeout=self.timeout_s) as client:
            while not self._stop_event.is_set():
                started = time.monotonic()
                try:
                    response = client.get("/healthz")
                    elapsed = time.monotonic() - started
                    if response.status_code != 200 or response.json() != {"status": "ok"}:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except (httpx.HTTPError, ValueError) as exc:
                    elapsed = max(time.monotonic() - started, self.timeout_s)
                    self.failures.append(f"{type(exc).__name__}: {exc}")
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


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None when ``name`` is
    not in the text at all."""
    found = [
        (sample_labels, value)
        for sample_name, sample_labels, value in metric_samples(text)
        if sample_name == name
    ]
    if not found:
        return None
    return sum(
        value
        for sample_labels, value in found
        if all(sample_labels.get(key) == want for key, want in labels.items())
    )


def raw_socket(port: int, rcvbuf: int | None = None, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout_s)
    sock.connect((LOOPBACK, port))
    return sock
