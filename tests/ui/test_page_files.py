"""The teaching page's files as the server hands them out (no browser needed): ``/`` and every
file under ``/ui/`` with its media type and the page's security headers, nothing outside the
page's folder, and every file listed in the server package's data so that ``pip install`` and
the Docker image ship it."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e.e2e_servers import Served

from hooklab_server.api.web import MEDIA_TYPES, WEB, web_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def http(ui_server: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        yield client


def test_the_page_and_its_files_are_served(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert http.head("/").status_code == 200
    files = web_files()
    assert {"index.html", "style.css", "js/main.js"} <= set(files)
    for name, path in files.items():
        answer = http.get(f"/ui/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == MEDIA_TYPES[path.suffix]
        assert answer.content == path.read_bytes()
    # Every module the page imports is one of its files.
    for name in files:
        if name.endswith(".js"):
            for line in files[name].read_text().splitlines():
                if line.startswith("import ") and " from " in line:
                    imported = line.rsplit(" from ", 1)[1].strip(" \";'")
                    assert imported.removeprefix("./") in {n.removeprefix("js/") for n in files}


@pytest.mark.parametrize(
    "path",
    ["/ui/", "/ui/nope.js", "/ui/../api/web.py", "/ui/%2e%2e/api/web.py", "/ui/js/../../py.typed"],
)
def test_nothing_else_is_served(http: httpx.Client, path: str) -> None:
    answer = http.get(path)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_every_page_file_is_package_data() -> None:
    project = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["hooklab_server"]
    for path in WEB.rglob("*"):
        if path.is_file():
            name = path.relative_to(WEB.parent).as_posix()
            assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
