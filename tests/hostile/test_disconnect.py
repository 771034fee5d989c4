"""Work stops when nobody waits for it (issue 8): a client that goes away, or a request whose
``timeout_s`` passes, stops forward / run_with_cache / patching / generate (JSON and SSE) within
about one layer / decode step / patching forward, is counted in ``/metrics``, gives its memory
back, and leaves the server responsive.

Written against the contract (/work/notes/contract.md), read from outside a real
``hooklab-server`` subprocess (``server_process.py``): its ``/metrics``, ``/healthz``, its ``VmRSS``
and its log.

* ``hooklab_work_units_total{op}`` (layers / decode steps / patching forwards executed) stops
  growing: after the disconnect at most ``EXTRA_UNITS`` more units, plus those that fit in
  ``SCRAPE_LAG_S`` (the time between the close and our scrape of ``/metrics``), and fewer in all
  than the uncancelled request runs;
* ``hooklab_cancelled_total{op, reason="disconnect"|"deadline"}`` grows by exactly 1;
* ``hooklab_inflight_requests{op}`` and ``hooklab_inflight_bytes`` are back to 0 within
  ``EXTRA_UNITS`` unit times + ``STOP_GRACE_S`` of the disconnect;
* ``/healthz`` answers within ``HEALTHZ_BOUND_S`` right after the disconnect and after the stop,
  and a tiny forward still works; the log has no traceback and no 500 for the request;
* memory: the server's ``VmRSS`` after the stop is at most
  ``before + max(RSS_SLACK_BYTES, RSS_SLACK_FRACTION * (peak - before))``. Not "back to the byte"
  (allocator and torch caches), but close: the server hands freed memory back to the system
  after big work (malloc_trim), cancelled work included (measured: within 2 MiB of before). The
  bound catches work that keeps running, and activations / KV caches / patched copies that stay
  referenced.
* a deadline: the same request with ``timeout_s: DEADLINE_S`` is answered 504
  ``deadline_exceeded`` (``stream: true``: an SSE ``error`` event with that code) within
  ``DEADLINE_SLACK_S`` + one unit time of the deadline, counted with ``reason="deadline"``.

Sizing: a bigger seeded GPT-2 checkpoint (8 layers, d_model 256, n_ctx 2048, the fixtures'
1000-token tokenizer), and requests measured on the spot: each operation's request is run once
uncancelled (``test_uncancelled_request_runs_long_enough``) and scaled up until it takes at least
``MIN_UNCANCELLED_S``, so a disconnect after ``DISCONNECT_AFTER_S`` is always mid-work, on any
machine. Streamed generate shares generate's sizing (same work). Before each test the server must
be idle (no CPU burnt), so work a failing test left running does not leak into the next.

About 60-90 s on 2 cores when the server stops work on time; longer while it does not (each
uncancelled request then runs to its end, 4-8 s, before the next test starts).
"""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.checkpoints import build_checkpoint

from .server_process import HOST, Metrics, ServerProcess, server_process

pytestmark = pytest.mark.slow

# ---- the model and the server ------------------------------------------------------------------

N_LAYERS = 8
CHECKPOINT = {"n_layer": N_LAYERS, "n_embd": 256, "n_head": 4, "n_positions": 2048}
VOCAB = 1000  # the fixtures' tokenizer
# Large enough for the sized requests (up to 256 x 256 tokens); everything else at its default.
SERVER_SETTINGS = {"max_tokens": "131072", "max_batch": "256"}

FRAMES = "application/vnd.hooklab.frames+msgpack"
SSE = "text/event-stream"

# ---- timing and bounds -------------------------------------------------------------------------

DISCONNECT_AFTER_S = 0.5  # the client closes its connection this long after sending
MIN_UNCANCELLED_S = 3.0  # every sized request runs at least this long when left alone
TARGET_UNCANCELLED_S = 4.5  # what a request is scaled to when it ran shorter than the minimum
DEADLINE_S = 0.5  # timeout_s of the deadline tests
DEADLINE_SLACK_S = 1.0  # the 504 / SSE error comes within this (+ one unit) of the deadline
EXTRA_UNITS = 2  # units after the disconnect: the one running, and one begun before it was seen
SCRAPE_LAG_S = 0.25  # close -> the server notices -> our /metrics scrape; units in it are allowed
STOP_GRACE_S = 1.0  # beyond EXTRA_UNITS unit times, for in-flight gauges to return to 0
HEALTHZ_BOUND_S = 1.0
RSS_SLACK_BYTES = 64 * 2**20
RSS_SLACK_FRACTION = 0.25
RSS_SETTLE_S = 3.0  # time allowed for freed memory to show in VmRSS
UNCANCELLED_CLIENT_TIMEOUT_S = 180.0

WORK = "hooklab_work_units_total"
CANCELLED = "hooklab_cancelled_total"
INFLIGHT = "hooklab_inflight_requests"
INFLIGHT_BYTES = "hooklab_inflight_bytes"


def token_ids(batch: int, pos: int, seed: int) -> list[list[int]]:
    """Seeded token ids past the special tokens (0-2)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(pos)] for _ in range(batch)]


# ---- the operations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation under test; ``body(scale)`` is its request at a size, ``scale`` growing
    the work linearly (batch rows, decode steps, patched positions)."""

    id: str
    op: str  # the op label in /metrics
    path: str
    body: Callable[[int], dict[str, Any]]
    scale: int  # first size tried
    max_scale: int
    min_units: Callable[[int], int]  # units an uncancelled run executes at least (contract)
    accept: str = "application/json"
    stream: bool = False
    sized_as: str | None = None  # share another op's sizing (same work)


def _forward(batch: int) -> dict[str, Any]:
    return {"input": token_ids(batch, 256, seed=0), "return_type": "loss"}


def _run_with_cache(batch: int) -> dict[str, Any]:
    return {
        "input": token_ids(batch, 256, seed=1),
        "return_type": "loss",
        "names": [f"blocks.{N_LAYERS - 1}.hook_resid_post"],
    }


def _patching(positions: int) -> dict[str, Any]:
    # One patched copy per forward: N_LAYERS * positions forwards of [1, positions].
    return {
        "corrupted": token_ids(1, positions, seed=2),
        "clean": token_ids(1, positions, seed=3),
        "activation": "resid_pre",
        "axes": ["layer", "pos"],
        "metric": {"kind": "logit_diff", "answer": 5, "wrong": 6},
        "patches_per_forward": 1,
    }


def _generate(steps: int) -> dict[str, Any]:
    return {
        "input": token_ids(8, 16, seed=4),
        "max_new_tokens": steps,
        "do_sample": False,
        "stop_at_eos": False,
        "return_type": "tokens",
    }


def _generate_stream(steps: int) -> dict[str, Any]:
    return {**_generate(steps), "stream": True}


OPS: tuple[Op, ...] = (
    Op("forward", "forward", "/v1/forward", _forward, 64, 256, lambda _: N_LAYERS),
    Op(
        "run_with_cache",
        "run_with_cache",
        "/v1/run_with_cache",
        _run_with_cache,
        64,
        256,
        lambda _: N_LAYERS,
        accept=FRAMES,
    ),
    Op(
        "patching",
        "patching",
        "/v1/patching",
        _patching,
        64,
        512,
        lambda positions: N_LAYERS * positions,
        accept=FRAMES,
    ),
    Op("generate", "generate", "/v1/generate", _generate, 400, 2000, lambda steps: steps - 1),
    Op(
        "generate_stream",
        "generate",
        "/v1/generate",
        _generate_stream,
        400,
        2000,
        lambda steps: steps - 1,
        accept=SSE,
        stream=True,
        sized_as="generate",
    ),
)
OPS_BY_ID = {op.id: op for op in OPS}


# ---- small tools -------------------------------------------------------------------------------


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.value(name, **labels)


def shown(value: float | None) -> str:
    return "absent" if value is None else f"{value:g}"


class Findings:
    """Soft checks: every broken promise of one test is reported together."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def fail_if_any(self, context: str) -> None:
        if self.problems:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            pytest.fail(f"{len(self.problems)} problems\n{listed}\n{context}", pytrace=False)


def current_rss(server: ServerProcess) -> int:
    rss = server.rss_bytes()
    assert rss is not None, f"no VmRSS for the server (pid {server.pid}): it is gone"
    return rss


class RssPeak:
    """Samples the server's VmRSS every 20 ms in a thread; ``stop()`` returns the peak."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.peak = current_rss(server)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-peak")
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            rss = self.server.rss_bytes()
            if rss is None:
                return
            self.peak = max(self.peak, rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join(timeout=5)
        return self.peak


def raw_post(server: ServerProcess, op: Op, body: dict[str, Any]) -> socket.socket:
    """Send ``body`` on a fresh loopback connection; the caller reads and closes it."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {op.path} HTTP/1.1\r\n"
        f"Host: {HOST}:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Accept: {op.accept}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock = server.raw_socket()
    sock.sendall(head + payload)
    return sock


def read_for(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What arrives on ``sock`` in ``seconds``, and whether the server closed it."""
    deadline = time.monotonic() + seconds
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return data, True
        data += chunk
    return data, False


@dataclass
class SseOutcome:
    status: int
    content_type: str
    events: list[tuple[str, str]] = field(default_factory=list)  # (event, data)
    seconds: float | None = None  # until the last (done / error) event, from the send
    timed_out: bool = False


def read_sse(client: httpx.Client, url: str, body: dict[str, Any], limit_s: float) -> SseOutcome:
    """POST ``body`` and read server-sent events until ``done`` / ``error``, the end of the
    stream, or ``limit_s`` seconds in all (then ``timed_out``)."""
    started = time.monotonic()
    with client.stream(
        "POST", url, json=body, headers={"accept": SSE}, timeout=min(limit_s, 10.0)
    ) as response:
        outcome = SseOutcome(response.status_code, response.headers.get("content-type", ""))
        if response.status_code != 200:
            response.read()
            outcome.events.append(("http", response.text))
            outcome.seconds = time.monotonic() - started
            return outcome
        event, data = "message", []
        try:
            for line in response.iter_lines():
                if time.monotonic() - started > limit_s:
                    outcome.timed_out = True
                    return outcome
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line:
                    if data:
                        outcome.events.append((event, "\n".join(data)))
                        if event in ("done", "error"):
                            outcome.seconds = time.monotonic() - started
                            return outcome
                    event, data = "message", []
        except httpx.TimeoutException:
            outcome.timed_out = True
    return outcome


# ---- sizing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sized:
    """An operation's request, sized so that it runs ``seconds`` ≥ MIN_UNCANCELLED_S alone."""

    op: Op
    scale: int
    body: dict[str, Any]
    seconds: float
    units: float | None  # work units of one uncancelled run (None: not exported)

    @property
    def unit_s(self) -> float:
        """Seconds per work unit (from the nominal unit count when the server counts none)."""
        return self.seconds / max(1.0, self.units or self.op.min_units(self.scale))

    def describe(self) -> str:
        return (
            f"{self.op.id} at scale {self.scale}: {self.seconds:.2f} s uncancelled, "
            f"{shown(self.units)} work units, {self.unit_s * 1000:.1f} ms per unit"
        )


def run_uncancelled(client: httpx.Client, server: ServerProcess, op: Op, body: dict) -> float:
    started = time.monotonic()
    if op.stream:
        outcome = read_sse(client, server.url + op.path, body, UNCANCELLED_CLIENT_TIMEOUT_S)
        assert outcome.status == 200 and outcome.events and outcome.events[-1][0] == "done", (
            f"{op.id}: uncancelled stream ended with {outcome.status} {outcome.events[-1:]}"
        )
    else:
        response = client.post(
            server.url + op.path,
            json=body,
            headers={"accept": op.accept},
            timeout=UNCANCELLED_CLIENT_TIMEOUT_S,
        )
        assert response.status_code == 200, (
            f"{op.id}: uncancelled request answered {response.status_code}: {response.text[:500]}"
        )
    return time.monotonic() - started


class Sizing:
    """Sizes each operation once per server (lazily, so one test alone sizes one op)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.sized: dict[str, Sized] = {}

    def __call__(self, op: Op) -> Sized:
        key = op.sized_as or op.id
        if key not in self.sized:
            self.sized[key] = self._measure(OPS_BY_ID[key])
        sized = self.sized[key]
        if key == op.id:
            return sized
        return replace(sized, op=op, body=op.body(sized.scale))

    def _measure(self, op: Op) -> Sized:
        scale = op.scale
        with httpx.Client(timeout=10.0) as client:
            for _ in range(3):
                self.server.wait_idle()
                before = self.server.metrics(client)
                body = op.body(scale)
                seconds = run_uncancelled(client, self.server, op, body)
                after = self.server.metrics(client)
                units = metric(after, WORK, op=op.op)
                if units is not None:
                    units -= metric(before, WORK, op=op.op) or 0.0
                if seconds >= MIN_UNCANCELLED_S or scale >= op.max_scale:
                    break
                scale = min(op.max_scale, math.ceil(scale * TARGET_UNCANCELLED_S / seconds))
        return Sized(op, scale, body, seconds, units)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def disconnect_checkpoint(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer, d_model 256, n_ctx 2048 seeded GPT-2 (neutral folder name: TransformerLens
    picks architectures from path substrings)."""
    out_dir = tmp_path_factory.mktemp("ckpt-slow", numbered=False)
    return build_checkpoint("gpt2", out_dir, seed=0, tokenizer_dir=tokenizer_dir, **CHECKPOINT)


@pytest.fixture(scope="module")
def server(
    disconnect_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("disconnect-server") / "server.log"
    with server_process(disconnect_checkpoint, log, SERVER_SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def sizing(server: ServerProcess) -> Sizing:
    return Sizing(server)


@pytest.fixture
def idle_server(server: ServerProcess) -> ServerProcess:
    """The server, alive and idle (a failed test's runaway work has finished)."""
    assert server.alive(), f"the server died:\n{server.log_tail()}"
    server.wait_idle()
    return server


# ---- checks shared by the tests ----------------------------------------------------------------


@dataclass
class Before:
    metrics: Metrics
    rss: int
    log_offset: int

    def counter(self, name: str, **labels: str) -> float:
        return metric(self.metrics, name, **labels) or 0.0


def snapshot(server: ServerProcess, client: httpx.Client) -> Before:
    return Before(server.metrics(client), current_rss(server), server.log_size())


@dataclass
class Stop:
    stopped: bool
    seconds: float  # from the close / deadline answer to the stop (or to giving up)
    metrics: Metrics


def wait_stopped(
    server: ServerProcess, client: httpx.Client, op: Op, since: float, budget_s: float
) -> Stop:
    """Poll /metrics until ``inflight_requests{op}`` is 0 and the op's work counter stands
    still between two scrapes, or ``budget_s`` after ``since`` passed."""
    last_units: float | None = None
    while True:
        scraped = server.metrics(client)
        now = time.monotonic()
        inflight = metric(scraped, INFLIGHT, op=op.op)
        units = metric(scraped, WORK, op=op.op)
        if inflight == 0 and units is not None and units == last_units:
            return Stop(True, now - since, scraped)
        if now - since > budget_s:
            return Stop(False, now - since, scraped)
        last_units = units
        time.sleep(0.05)


def check_counters(
    found: Findings,
    sized: Sized,
    before: Before,
    stop: Stop,
    reason: str,
    units_at_cancel: float | None,
    budget_s: float,
) -> None:
    op = sized.op
    end = stop.metrics
    inflight = metric(end, INFLIGHT, op=op.op)
    found.check(
        stop.stopped,
        f"the work did not stop within {budget_s:.2f} s ({EXTRA_UNITS} units of "
        f"{sized.unit_s * 1000:.0f} ms + {STOP_GRACE_S} s): {INFLIGHT}{{op={op.op}}} = "
        f"{shown(inflight)}, {WORK}{{op={op.op}}} = {shown(metric(end, WORK, op=op.op))}",
    )
    cancelled = metric(end, CANCELLED, op=op.op, reason=reason)
    found.check(
        cancelled is not None
        and cancelled - before.counter(CANCELLED, op=op.op, reason=reason) == 1,
        f'{CANCELLED}{{op="{op.op}",reason="{reason}"}} went from '
        f"{before.counter(CANCELLED, op=op.op, reason=reason):g} to {shown(cancelled)}, not +1",
    )
    units_end = metric(end, WORK, op=op.op)
    units_before = before.counter(WORK, op=op.op)
    if units_end is None:
        found.check(False, f"{WORK}{{op={op.op}}} absent from /metrics")
    else:
        done = units_end - units_before
        if sized.units is not None:
            found.check(
                done < sized.units,
                f"{done:g} work units ran: as many as the uncancelled request ({sized.units:g})",
            )
        if units_at_cancel is not None:
            allowed = EXTRA_UNITS + math.floor(SCRAPE_LAG_S / sized.unit_s)
            after = units_end - units_at_cancel
            found.check(
                after <= allowed,
                f"{after:g} work units ran after the {reason} (allowed {allowed}: "
                f"{EXTRA_UNITS} + those in {SCRAPE_LAG_S} s)",
            )
    inflight_bytes = metric(end, INFLIGHT_BYTES)
    found.check(inflight_bytes == 0, f"{INFLIGHT_BYTES} = {shown(inflight_bytes)}, not 0")


def check_responsive(found: Findings, server: ServerProcess, client: httpx.Client) -> None:
    seconds = server.healthz_seconds(timeout_s=5.0)
    found.check(seconds < HEALTHZ_BOUND_S, f"/healthz took {seconds:.2f} s after the stop")
    response = client.post(
        server.url + "/v1/forward", json={"input": [[5, 6, 7, 8]], "return_type": "loss"}
    )
    found.check(response.status_code == 200, f"a tiny forward got {response.status_code}")


def check_log(found: Findings, server: ServerProcess, before: Before, what: str) -> None:
    log = server.log_text(before.log_offset)
    found.check("Traceback" not in log, f"the {what} logged a traceback:\n{log[-3000:]}")
    found.check('" 500' not in log, f"the {what} was logged as a 500:\n{log[-1500:]}")


def settled_rss(server: ServerProcess, bound: int) -> int:
    deadline = time.monotonic() + RSS_SETTLE_S
    while True:
        rss = current_rss(server)
        if rss <= bound or time.monotonic() > deadline:
            return rss
        time.sleep(0.1)


# ---- tests -------------------------------------------------------------------------------------

ids = [op.id for op in OPS]
MiB = 2**20


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_uncancelled_request_runs_long_enough(
    op: Op, idle_server: ServerProcess, sizing: Sizing
) -> None:
    """The sizing itself: left alone, the request runs ≥ MIN_UNCANCELLED_S, so the disconnect
    after DISCONNECT_AFTER_S is mid-work; and the work counter counts what the contract says."""
    sized = sizing(op)
    print(sized.describe())
    assert sized.seconds >= MIN_UNCANCELLED_S, (
        f"{sized.describe()}: shorter than {MIN_UNCANCELLED_S} s even at max scale"
    )
    assert sized.units is not None, f"{WORK}{{op={op.op}}} is not exported by /metrics"
    assert sized.units >= op.min_units(sized.scale), (
        f"{sized.describe()}: expected at least {op.min_units(sized.scale)} units "
        "(layers / decode steps / patching forwards)"
    )


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_disconnect_stops_the_work(op: Op, idle_server: ServerProcess, sizing: Sizing) -> None:
    sized = sizing(op)
    server = idle_server
    server.wait_idle()
    found = Findings()
    budget_s = EXTRA_UNITS * sized.unit_s + STOP_GRACE_S
    with httpx.Client(timeout=10.0) as client:
        before = snapshot(server, client)
        peak = RssPeak(server)
        sock = raw_post(server, op, sized.body)
        try:
            early, closed = read_for(sock, DISCONNECT_AFTER_S)
        finally:
            sock.close()
        closed_at = time.monotonic()
        at_close = server.metrics(client)
        healthz_during = server.healthz_seconds(timeout_s=5.0)
        stop = wait_stopped(server, client, op, closed_at, budget_s)
        peak_rss = peak.stop()

        # The disconnect must have been mid-work, or nothing below means anything.
        if op.stream:
            assert early.startswith(b"HTTP/1.1 200") and b"event: token" in early, (
                f"the stream had not started after {DISCONNECT_AFTER_S} s: {early[:500]!r}"
            )
            assert b"event: done" not in early and b"event: error" not in early, early[-500:]
        else:
            assert not early and not closed, (
                f"answered before the disconnect ({sized.describe()}): {early[:500]!r}"
            )

        units_at_close = metric(at_close, WORK, op=op.op)
        check_counters(found, sized, before, stop, "disconnect", units_at_close, budget_s)
        found.check(
            healthz_during < HEALTHZ_BOUND_S,
            f"/healthz took {healthz_during:.2f} s right after the disconnect",
        )
        check_responsive(found, server, client)
        check_log(found, server, before, "disconnect")

        # Memory: only meaningful once the work stopped (running work holds its memory).
        grown = max(0, peak_rss - before.rss)
        bound = before.rss + max(RSS_SLACK_BYTES, int(RSS_SLACK_FRACTION * grown))
        rss_after = settled_rss(server, bound) if stop.stopped else current_rss(server)
        found.check(
            not stop.stopped or rss_after <= bound,
            f"VmRSS {rss_after / MiB:.0f} MiB up to {RSS_SETTLE_S} s after the stop; before "
            f"{before.rss / MiB:.0f}, peak {peak_rss / MiB:.0f}, bound {bound / MiB:.0f} MiB",
        )
    summary = (
        f"{sized.describe()}; closed after {DISCONNECT_AFTER_S} s; units before "
        f"{before.counter(WORK, op=op.op):g}, at close {shown(units_at_close)}, at the stop "
        f"{shown(metric(stop.metrics, WORK, op=op.op))} ({stop.seconds:.2f} s after the close); "
        f"VmRSS before {before.rss / MiB:.0f} MiB, peak {peak_rss / MiB:.0f} MiB, "
        f"after {rss_after / MiB:.0f} MiB"
    )
    print(summary)
    found.fail_if_any(summary)


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_deadline_stops_the_work(op: Op, idle_server: ServerProcess, sizing: Sizing) -> None:
    sized = sizing(op)
    server = idle_server
    server.wait_idle()
    found = Findings()
    body = {**sized.body, "timeout_s": DEADLINE_S}
    answer_bound_s = DEADLINE_S + DEADLINE_SLACK_S + sized.unit_s
    client_limit_s = answer_bound_s + 2.0
    budget_s = EXTRA_UNITS * sized.unit_s + STOP_GRACE_S
    with httpx.Client(timeout=10.0) as client:
        before = snapshot(server, client)
        started = time.monotonic()
        if op.stream:
            outcome = read_sse(client, server.url + op.path, body, client_limit_s)
            answered_after = outcome.seconds
            assert not outcome.timed_out, (
                f"no done/error event within {client_limit_s:.1f} s of the send "
                f"({len(outcome.events)} events; {sized.describe()})"
            )
            assert outcome.status == 200 and outcome.content_type.startswith(SSE), (
                f"expected an event stream, got {outcome.status}: {outcome.events[-1:]}"
            )
            last_event, data = outcome.events[-1]
            assert last_event == "error", f"the stream ended with {last_event!r}: {data[:300]}"
            error = json.loads(data).get("error", {})
        else:
            try:
                response = client.post(
                    server.url + op.path,
                    json=body,
                    headers={"accept": op.accept},
                    timeout=client_limit_s,
                )
            except httpx.TimeoutException:
                pytest.fail(
                    f"no answer within {client_limit_s:.1f} s of a request with timeout_s "
                    f"{DEADLINE_S} ({sized.describe()})"
                )
            answered_after = time.monotonic() - started
            assert response.status_code == 504, (
                f"expected 504, got {response.status_code}: {response.text[:500]}"
            )
            error = response.json().get("error", {})
            found.check(
                bool(error.get("request_id"))
                and error.get("request_id") == response.headers.get("x-request-id"),
                f"error.request_id {error.get('request_id')!r} vs x-request-id header "
                f"{response.headers.get('x-request-id')!r}",
            )
        answered_at = time.monotonic()
        at_answer = server.metrics(client)
        assert error.get("code") == "deadline_exceeded", f"error body: {error}"
        assert answered_after is not None
        found.check(
            answered_after <= answer_bound_s,
            f"answered {answered_after:.2f} s after the send: more than {DEADLINE_SLACK_S} s "
            f"+ one unit ({sized.unit_s:.2f} s) past the {DEADLINE_S} s deadline",
        )
        stop = wait_stopped(server, client, op, answered_at, budget_s)
        units_at_answer = metric(at_answer, WORK, op=op.op)
        check_counters(found, sized, before, stop, "deadline", units_at_answer, budget_s)
        check_responsive(found, server, client)
        check_log(found, server, before, "deadline")
    summary = (
        f"{sized.describe()}; answered after {answered_after:.2f} s; units before "
        f"{before.counter(WORK, op=op.op):g}, at the answer {shown(units_at_answer)}, at the stop "
        f"{shown(metric(stop.metrics, WORK, op=op.op))} ({stop.seconds:.2f} s after the answer)"
    )
    print(summary)
    found.fail_if_any(summary)
