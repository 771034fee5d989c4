"""A seeded, bounded schemathesis fuzz of every operation in the live server's ``/openapi.json``
(issue 8): no request the schema can describe — valid or not — gets a 5xx (schemathesis's
``not_a_server_error``), no request goes unanswered, nothing reaches the server log as a
traceback, and the server still answers ``/healthz`` (and a forward) afterwards.

The only 5xx allowed are the contract's two answers to a client's own request, each with its
code: 504 ``deadline_exceeded`` (a fuzzed ``timeout_s: 5e-324`` legitimately gets it) and 507
``store_full``.

The server is a real ``hooklab-server`` subprocess (``server_process.py``) over the tiny GPT-2
checkpoint, with tiny limits so that every fuzzed request is cheap: 64 tokens, 4 prompts, a few
patching forwards, small bodies and responses, a 10 s deadline. ``--max-tokens`` and
``--max-batch`` are flags; the other limits go in as ``HOOKLAB_*`` variables, which the contract
(every setting is a flag *and* a variable) makes equivalent and which an older CLI ignores.

The schema offers each request body as JSON and as msgpack (same schema); only JSON is fuzzed
(the msgpack entries are dropped before schemathesis sees the document, and ``format: binary``
strings, msgpack ``bin`` fields, become plain strings: schemathesis cannot put bytes in JSON).

schemathesis runs through its engine (``schemathesis.engine``, what ``st run`` uses), not its
pytest plugin: the plugin's lazy ``from_fixture`` loader sets pytest's private ``Node._nodeid``,
which pytest 9 no longer has. Its ``max-time`` is not set either: with it the engine repeats
the phases until the time is up instead of stopping.

Bounded and reproducible: the ``examples``, ``coverage`` (a deterministic set of boundary and
type-violating cases per field: ~1,800 for forward, ~1,400 for generate) and ``fuzzing``
(``FUZZ_EXAMPLES`` per operation, schema-valid and -invalid) phases with a fixed seed,
derandomized Hypothesis (no example database), no shrinking (a failure is reported as
generated, with a curl line to reproduce it), no stateful phase. About 10,000 requests in
~20 s, ~30 s with the server start, on 2 cores.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import schemathesis.engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from .server_process import ServerProcess, server_executable, server_process

pytestmark = pytest.mark.slow

SEED = 8_2026
FUZZ_EXAMPLES = 30  # fuzzing-phase cases per operation (the coverage phase adds its own)
REQUEST_TIMEOUT_S = 20.0  # per fuzzed request, client side: a hang is a failure, not a wait
HEALTHZ_BOUND_S = 1.0
# 5xx statuses the contract gives for a client's own request, and the only code each may carry:
# the work passed the request's timeout_s (a fuzzed timeout_s of 5e-324 does), the store is full.
ALLOWED_5XX = {504: "deadline_exceeded", 507: "store_full"}

JSON_MEDIA_TYPE = "application/json"

# Tiny limits, so that whatever the fuzzer picks runs in milliseconds on the tiny model.
SERVER_SETTINGS = {"max_tokens": "64", "max_batch": "4"}
SERVER_ENV = {
    "HOOKLAB_MAX_REQUEST_BYTES": "256KiB",
    "HOOKLAB_MAX_REQUEST_ITEMS": "20000",
    "HOOKLAB_MAX_TEXT_CHARS": "2048",
    "HOOKLAB_MAX_SPECS": "8",
    "HOOKLAB_MAX_SELECTOR_LENGTH": "64",
    "HOOKLAB_MAX_NAMES": "64",
    "HOOKLAB_MAX_HOOK_APPLICATIONS": "256",
    "HOOKLAB_MAX_PATCHING_ROWS": "256",
    "HOOKLAB_MAX_PATCHING_FORWARDS": "16",
    "HOOKLAB_PATCHING_BUDGET_BYTES": "16MiB",
    "HOOKLAB_MAX_RESPONSE_BYTES": "8MiB",
    "HOOKLAB_MAX_JSON_RESPONSE_BYTES": "2MiB",
    "HOOKLAB_REQUEST_TIMEOUT_S": "10",
    "HOOKLAB_MAX_TIMEOUT_S": "10",
    "HOOKLAB_BODY_TIMEOUT_S": "10",
    "HOOKLAB_MAX_STORED_BYTES": "4MiB",
    "HOOKLAB_MAX_STORED_OBJECTS": "64",
    "HOOKLAB_STORE_TTL_S": "60",
}

# Every operation of the schema is fuzzed; these are the ones that must be there.
EXPECTED_OPERATIONS = {
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/model",
    "POST /v1/tokenize",
    "POST /v1/detokenize",
    "POST /v1/forward",
    "POST /v1/run_with_cache",
    "POST /v1/run_with_hooks",
    "POST /v1/generate",
    "POST /v1/patching",
    "POST /v1/tensors",
}


def schemathesis_config(base_url: str, key: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {key}"},
            "request-timeout": REQUEST_TIMEOUT_S,
            "continue-on-failure": True,  # every operation gets all its cases, failing or not
            "suppress-health-check": ["all"],  # slow or heavily filtered strategies are fine here
            "output": {"sanitization": {"enabled": False}},  # show the bodies as sent
            "generation": {
                "mode": "all",  # schema-valid and schema-invalid cases
                "max-examples": FUZZ_EXAMPLES,
                "deterministic": True,  # derandomized Hypothesis, no example database
                "no-shrink": True,  # bounded time: report the failing case as generated
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            # Only `not_a_server_error`: whether a valid body may still be refused (limits, an
            # unknown hook name ...) is the hostile-requests table's business, not the fuzz's.
            "checks": {
                "enabled": False,
                "not_a_server_error": {
                    "enabled": True,
                    # The contract's two 5xx answers to a client's own request; their error
                    # codes are checked on every such response (``ALLOWED_5XX``).
                    "expected-statuses": ["2xx", "3xx", "4xx", *map(str, ALLOWED_5XX)],
                },
            },
        }
    )


def json_only(openapi: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``openapi`` whose request bodies offer only ``application/json``, and whose
    ``format: binary`` strings (msgpack ``bin`` fields: JSON has no raw bytes) are plain strings
    (schemathesis cannot put generated bytes into a JSON body)."""
    document = copy.deepcopy(openapi)
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            content = operation.get("requestBody", {}).get("content")
            if content and JSON_MEDIA_TYPE in content:
                for media_type in list(content):
                    if media_type != JSON_MEDIA_TYPE:
                        del content[media_type]
    _drop_binary_formats(document)
    return document


def _drop_binary_formats(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("format") == "binary":
            del node["format"]
        for value in node.values():
            _drop_binary_formats(value)
    elif isinstance(node, list):
        for value in node:
            _drop_binary_formats(value)


def operation_labels(openapi: dict[str, Any]) -> set[str]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {
        f"{method.upper()} {path}"
        for path, item in openapi.get("paths", {}).items()
        for method in item
        if method in methods
    }


# ---- running the fuzz ---------------------------------------------------------------------------


@dataclass
class Problem:
    """One failed check or engine error, with what is needed to reproduce it."""

    label: str  # "POST /v1/forward"
    phase: str
    title: str
    detail: str  # curl line, or the error

    def __str__(self) -> str:
        return f"[{self.phase}] {self.label}: {self.title}\n    {self.detail}"


@dataclass
class FuzzRun:
    """What the schemathesis engine did: cases and response statuses per (phase, operation),
    the failed checks, the engine errors, how it stopped."""

    cases: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    bare_4xx: list[Problem] = field(default_factory=list)  # 4xx without the error envelope
    stop_reason: str = "not finished"
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"stopped: {self.stop_reason} after {self.seconds:.1f} s"]
        for label in sorted(self.statuses):
            phases = {phase: n for (phase, op), n in self.cases.items() if op == label}
            statuses = dict(sorted(self.statuses[label].items()))
            lines.append(f"  {label}: cases {phases}, statuses {statuses}")
        return "\n".join(lines)


def _phase_name(phase: Any) -> str:
    return str(getattr(phase, "value", phase))


def run_fuzz(schema: Any) -> FuzzRun:
    run = FuzzRun()
    started = time.perf_counter()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record_scenario(run, _phase_name(event.phase), event.recorder)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(
                Problem(
                    event.label,
                    _phase_name(event.phase),
                    type(event.value).__name__,
                    f"{event.value}\n    {event.info.code_sample or ''}".rstrip(),
                )
            )
        elif isinstance(event, events.FatalError):
            run.errors.append(
                Problem("-", "-", type(event.exception).__name__, str(event.exception))
            )
        elif isinstance(event, events.EngineFinished):
            run.stop_reason = str(event.stop_reason.value)
    run.seconds = time.perf_counter() - started
    return run


def _record_scenario(run: FuzzRun, phase: str, recorder: Any) -> None:
    label = recorder.label
    run.cases[(phase, label)] += len(recorder.cases)
    statuses = run.statuses[label]
    for interaction in recorder.interactions.values():
        response = interaction.response
        statuses[response.status_code if response is not None else -1] += 1
        bare = response is not None and _error_code(response.content) is None
        if response is not None and 400 <= response.status_code < 500 and bare:
            run.bare_4xx.append(
                Problem(
                    label,
                    phase,
                    f"{response.status_code} without the error envelope",
                    f"{interaction.request.method} {interaction.request.uri} -> "
                    f"{response.content[:200]!r}",
                )
            )
        if response is not None and response.status_code in ALLOWED_5XX:
            expected = ALLOWED_5XX[response.status_code]
            code = _error_code(response.content)
            if code != expected:
                run.failures.append(
                    Problem(
                        label,
                        phase,
                        f"{response.status_code} with code {code!r}, not {expected!r}",
                        f"{interaction.request.method} {interaction.request.uri} "
                        f"{(interaction.request.body or b'')[:500]!r}",
                    )
                )
    for checks in recorder.checks.values():
        for check in checks:
            info = check.failure_info
            if check.status != Status.FAILURE or info is None:
                continue
            run.failures.append(Problem(label, phase, info.failure.title, info.code_sample))


def _error_code(content: bytes) -> str | None:
    try:
        return json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def report(problems: list[Problem], limit: int = 3) -> str:
    """At most ``limit`` problems per operation and title, and how many there were."""
    groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
    for problem in problems:
        groups[(problem.label, problem.title)].append(problem)
    lines = []
    for (label, title), group in sorted(groups.items()):
        lines.append(f"{label}: {title} ({len(group)}x)")
        lines += [f"    {p.detail}" for p in group[:limit]]
    return "\n".join(lines)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A keys file with one admin key, made by the real command: the fuzz runs as a user of a
    shared server does, through authentication."""
    keys_file = tmp_path_factory.mktemp("fuzz-keys") / "keys.json"
    made = subprocess.run(
        [server_executable(), "keys", "--keys-file", str(keys_file), "add", "fuzz", "--admin"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return keys_file, made.stdout.strip()


@pytest.fixture(scope="module")
def fuzz_server(
    gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, fuzz_key: tuple[Path, str]
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    settings = {**SERVER_SETTINGS, "keys_file": str(fuzz_key[0])}
    with server_process(gpt2_checkpoint, log, settings, SERVER_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def openapi(fuzz_server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(fuzz_server.url + "/openapi.json", timeout=10.0)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def fuzz_run(
    fuzz_server: ServerProcess, openapi: dict[str, Any], fuzz_key: tuple[Path, str]
) -> FuzzRun:
    schema = schemathesis.openapi.from_dict(
        json_only(openapi), config=schemathesis_config(fuzz_server.url, fuzz_key[1])
    )
    return run_fuzz(schema)


# ---- tests -------------------------------------------------------------------------------------


def test_schema_lists_every_operation(openapi: dict[str, Any]) -> None:
    """The fuzz covers what the schema lists; make sure it lists the API, JSON bodies only."""
    missing = EXPECTED_OPERATIONS - operation_labels(openapi)
    assert not missing, f"/openapi.json lacks {sorted(missing)}"
    bodies = json_only(openapi)
    for label in operation_labels(bodies):
        method, path = label.split(" ", 1)
        content = bodies["paths"][path][method.lower()].get("requestBody", {}).get("content", {})
        assert set(content) <= {JSON_MEDIA_TYPE}, f"{label}: {sorted(content)} left after json_only"


def test_fuzz_ran_every_operation(fuzz_run: FuzzRun, openapi: dict[str, Any]) -> None:
    """The engine finished (not stopped by an unreachable server) and sent requests to every
    operation of the schema."""
    print(fuzz_run.summary())
    assert fuzz_run.stop_reason == "completed", fuzz_run.summary()
    unfuzzed = {label for label in operation_labels(openapi) if not fuzz_run.statuses[label]}
    assert not unfuzzed, f"no request sent to {sorted(unfuzzed)}\n{fuzz_run.summary()}"


def test_no_server_errors(fuzz_run: FuzzRun) -> None:
    """``not_a_server_error``: no generated request (valid or not) got a 5xx."""
    assert not fuzz_run.failures, (
        f"{len(fuzz_run.failures)} failed checks\n{report(fuzz_run.failures)}\n\n"
        f"{fuzz_run.summary()}"
    )


def test_every_4xx_is_in_the_error_envelope(fuzz_run: FuzzRun) -> None:
    assert not fuzz_run.bare_4xx, (
        f"{len(fuzz_run.bare_4xx)} 4xx answers without {{'error': {{'code', ...}}}}\n"
        f"{report(fuzz_run.bare_4xx)}"
    )


def test_fuzz_was_authenticated(fuzz_run: FuzzRun) -> None:
    """The key reached the server: most answers are not 401."""
    statuses = sum(fuzz_run.statuses.values(), Counter())
    assert statuses[401] < sum(statuses.values()) / 10, fuzz_run.summary()


def test_no_transport_errors(fuzz_run: FuzzRun) -> None:
    """No request ended without an answer (timeout, reset, bare close) and the engine had no
    error of its own (a schema it cannot read, say)."""
    assert not fuzz_run.errors, f"{len(fuzz_run.errors)} errors\n{report(fuzz_run.errors)}"


def test_server_answers_healthz_after_the_fuzz(
    fuzz_run: FuzzRun, fuzz_server: ServerProcess, fuzz_key: tuple[Path, str]
) -> None:
    assert fuzz_server.alive(), f"the server died:\n{fuzz_server.log_tail()}"
    seconds = fuzz_server.healthz_seconds(timeout_s=5.0)
    assert seconds < HEALTHZ_BOUND_S, f"/healthz took {seconds:.2f} s after the fuzz"
    # ... and it still does real work.
    response = httpx.post(
        fuzz_server.url + "/v1/forward",
        json={"input": [[1, 2, 3, 4]], "return_type": "loss"},
        headers={"authorization": f"Bearer {fuzz_key[1]}"},
        timeout=10.0,
    )
    assert response.status_code == 200, response.text


def test_fuzz_logged_no_tracebacks(fuzz_run: FuzzRun, fuzz_server: ServerProcess) -> None:
    """Bad input is answered, not crashed on: no unhandled exception reached the log (contract:
    ``internal`` 500 never for bad input; a client going away is one line, not a traceback)."""
    log = fuzz_server.log_text()
    starts = [m.start() for m in re.finditer(r"^Traceback \(most recent call last\)", log, re.M)]
    if starts:
        first = log[max(0, starts[0] - 400) : starts[0] + 3000]
        pytest.fail(f"{len(starts)} tracebacks in the server log; the first:\n{first}")
