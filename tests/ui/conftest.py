"""The teaching page (issue 16) in a real headless Chromium: Debian's ``chromium`` package, driven
by Playwright for Python with that executable (Playwright never downloads a browser here).
``make test`` installs both (docker/install.sh: the Playwright pin in server's test extras, the
``browser`` step for chromium); where no Chromium could be installed these tests skip, saying so.

The page runs against a real uvicorn serving a tiny seeded GPT-2 (embedded), with TransformerLens
on the same weights as the reference (``Served.tl``). Its context is 1024 positions, so that a
generation is long enough to be stopped while it streams. Each test gets a fresh browser page
of a laptop's size; JavaScript errors fail the test, and screenshots are written under the test's
temporary folder (``screenshots/``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.e2e_servers import Served, served_checkpoint

from fixtures.checkpoints import build_checkpoint
from hooklab_server.settings import Settings

CHROMIUM = Path(os.environ.get("HOOKLAB_CHROMIUM", "/usr/bin/chromium"))
LAPTOP = {"width": 1366, "height": 768}
# Chromium reports every HTTP error status of a fetch as a console error; tests that expect
# refusals (401, 429, 422) allow these, never a script error.
NETWORK_ERROR = "Failed to load resource: the server responded with a status of"


def _why_no_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (make test installs server's test extras)"
    if not CHROMIUM.exists():
        return (
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium where apt-get "
            "can (sh docker/install.sh dev browser); set HOOKLAB_CHROMIUM to use another"
        )
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    reason = _why_no_browser()
    if reason is not None:
        pytest.skip(f"browser tests skipped: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def ui_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The session tokenizer's tiny GPT-2 (2 layers, 4 heads), with a 1024-position context."""
    folder = tmp_path_factory.mktemp("ckpt-page")
    return build_checkpoint("gpt2", folder, seed=0, tokenizer_dir=tokenizer_dir, n_positions=1024)


@pytest.fixture(scope="package")
def ui_server(ui_checkpoint: Path) -> Iterator[Served]:
    """An open embedded server over the checkpoint, with TransformerLens beside it. Its decode
    pool takes the whole context, so that the playground's two long generations stream side by
    side (a generation longer than the pool's rows would run alone, the other waiting)."""
    with served_checkpoint(ui_checkpoint, Settings(decode_positions=1024)) as served:
        yield served


class PageErrors:
    """Every script error of a page, and its console errors (HTTP error statuses allowed only
    when a test says it expects them)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allow_http_errors = False

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def page_error(self, error: Any) -> None:
        self.errors.append(f"uncaught: {error}")

    def unexpected(self) -> list[str]:
        return [
            error
            for error in self.errors
            if not (self.allow_http_errors and NETWORK_ERROR in error)
        ]


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest.fixture
def page(browser: Any, page_errors: PageErrors) -> Iterator[Any]:
    """A fresh page (own context: empty local storage) of a laptop's size; no script errors."""
    context = browser.new_context(viewport=LAPTOP)
    context.set_default_timeout(30_000)
    opened = context.new_page()
    opened.on("console", page_errors.console)
    opened.on("pageerror", page_errors.page_error)
    try:
        yield opened
    finally:
        context.close()
    assert not page_errors.unexpected(), page_errors.unexpected()
