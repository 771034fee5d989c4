"""The packages keep their boundaries: the client installs and imports without the server's
dependencies, neither side imports the other (what they share — the wire contract, the
ActivationCache analysis — is a package of its own), and the server's command exists."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SERVER_ONLY = ("fastapi", "uvicorn", "transformers", "redis", "starlette")


def dependencies(package: str) -> list[str]:
    project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
    return project["dependencies"]


def imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_client_declares_no_server_dependency() -> None:
    declared = " ".join(dependencies("client")).lower()
    for name in (*SERVER_ONLY, "hooklab-server"):
        assert name not in declared


@pytest.mark.parametrize(
    "statement,forbidden",
    [
        ("import hooklab", {*SERVER_ONLY, "hooklab_server"}),
        ("import hooklab_proto", {*SERVER_ONLY, "hooklab", "hooklab_server"}),
        ("import hooklab_server", {"hooklab"}),
        ("import hooklab_server.ops.analysis", {"hooklab"}),
        ("import hooklab_analysis", {*SERVER_ONLY, "hooklab", "hooklab_server", "hooklab_proto"}),
    ],
)
def test_imports_stay_inside_their_boundary(statement: str, forbidden: set[str]) -> None:
    assert not imported_modules(statement) & forbidden


def test_both_sides_depend_on_what_they_share() -> None:
    for shared in ("hooklab-proto", "hooklab-analysis"):
        assert shared in dependencies("client")
        assert shared in dependencies("server")


def test_server_command_parses_its_options() -> None:
    server = Path(sys.executable).parent / "hooklab-server"
    out = subprocess.run([server, "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--model", "--host", "--port", "--device", "--dtype"):
        assert option in out
