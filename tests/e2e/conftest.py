"""End-to-end fixtures: a real uvicorn server on a free loopback port, the real client, and
TransformerLens 3.9 on the same weights as the reference (``e2e_servers``).

One server per checkpoint lives for the whole session (``gpt2_server``, ``llama_server``,
``neox_server``, and ``server`` parametrised over them; defined in ``fixtures/served.py`` and
shared with the notebook suite), in each deployment: embedded, and scaled out over Redis with
two worker processes (``deployment``), so every test using them runs against both; so do
``limited_server``, ``make_server`` and servers made with ``serve_in``.
The scheduler's own tests (merged forwards, the decode pool) keep an embedded server: they
watch one process's batching, which scaled out happens inside each worker.

``limited_server`` is a fresh server per test with tiny limits (tokens, batch, body and response
size, store bytes); ``make_server`` starts servers with any other ``Settings``. Every server is
stopped, and its thread joined, when its fixture ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.served import ServeIn
from hooklab_server.settings import Settings

from .e2e_servers import TINY_LIMITS, Served


@pytest.fixture
def limited_server(serve_in: ServeIn, gpt2_checkpoint: Path) -> Iterator[Served]:
    """A fresh GPT-2 server (empty store) with ``TINY_LIMITS``."""
    with serve_in(gpt2_checkpoint, TINY_LIMITS) as served:
        yield served


@pytest.fixture
def make_server(serve_in: ServeIn, gpt2_checkpoint: Path) -> Iterator[Callable[..., Served]]:
    """``make_server(**settings)``: a fresh GPT-2 server with those ``Settings`` fields."""
    stack: list[Any] = []

    def make(**fields: Any) -> Served:
        context = serve_in(gpt2_checkpoint, Settings(**fields))
        served = context.__enter__()
        stack.append(context)
        return served

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def http(gpt2_server: Served) -> Iterator[httpx.Client]:
    """A raw httpx client on the GPT-2 server (curl-style requests)."""
    with httpx.Client(base_url=gpt2_server.url, timeout=60) as client:
        yield client
