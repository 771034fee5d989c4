"""End-to-end fixtures: a real uvicorn server on a free loopback port, the real client, and
TransformerLens 3.9 on the same weights as the reference (``e2e_servers``).

One server per checkpoint lives for the whole session (``gpt2_server``, ``llama_server``,
``neox_server``, and ``server`` parametrised over them), in each deployment: embedded, and
scaled out over Redis with two worker processes (``deployment``), so every test using them
runs against both. ``limited_server`` is a fresh server per
test with tiny limits (tokens, batch, body and response size, store bytes); ``make_server`` starts
servers with any other ``Settings``. Every server is stopped, and its thread joined, when its
fixture ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.redis_server import RedisServer
from hooklab_server.settings import Settings

from .e2e_servers import TINY_LIMITS, Served, scaled_out_checkpoint, served_checkpoint

DEPLOYMENTS = ("embedded", "redis")


@pytest.fixture(scope="session", params=DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest) -> str:
    """How the session servers run: one process (embedded), or scaled out (redis: the API tier
    over a real redis-server and two hooklab-worker processes per model)."""
    return str(request.param)


@pytest.fixture(scope="session")
def e2e_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the e2e deployments' own (other tests empty the shared one)."""
    server = RedisServer(tmp_path_factory.mktemp("e2e-redis")).start()
    yield server
    server.stop()


@contextmanager
def _session_server(
    request: pytest.FixtureRequest, deployment: str, checkpoint: Path
) -> Iterator[Served]:
    if deployment == "embedded":
        with served_checkpoint(checkpoint) as served:
            yield served
        return
    redis_url = request.getfixturevalue("e2e_redis").url
    folder = request.getfixturevalue("tmp_path_factory").mktemp(f"{checkpoint.name}-workers")
    with scaled_out_checkpoint(checkpoint, redis_url, folder) as served:
        yield served


@pytest.fixture(scope="session")
def gpt2_server(
    request: pytest.FixtureRequest, deployment: str, gpt2_checkpoint: Path
) -> Iterator[Served]:
    with _session_server(request, deployment, gpt2_checkpoint) as served:
        yield served


@pytest.fixture(scope="session")
def llama_server(
    request: pytest.FixtureRequest, deployment: str, llama_checkpoint: Path
) -> Iterator[Served]:
    with _session_server(request, deployment, llama_checkpoint) as served:
        yield served


@pytest.fixture(scope="session")
def neox_server(
    request: pytest.FixtureRequest, deployment: str, neox_checkpoint: Path
) -> Iterator[Served]:
    with _session_server(request, deployment, neox_checkpoint) as served:
        yield served


SERVER_ARCHS = ("gpt2", "llama", "neox")


@pytest.fixture(params=SERVER_ARCHS)
def server(request: pytest.FixtureRequest, deployment: str) -> Served:
    """Each session server in turn (ids gpt2, llama, neox), in each deployment."""
    served: Served = request.getfixturevalue(f"{request.param}_server")
    served.model.reset_hooks()  # a failed test must not leave hooks on the shared client
    return served


@pytest.fixture
def limited_server(gpt2_checkpoint: Path) -> Iterator[Served]:
    """A fresh GPT-2 server (empty store) with ``TINY_LIMITS``."""
    with served_checkpoint(gpt2_checkpoint, TINY_LIMITS) as served:
        yield served


@pytest.fixture
def make_server(gpt2_checkpoint: Path) -> Iterator[Callable[..., Served]]:
    """``make_server(**settings)``: a fresh GPT-2 server with those ``Settings`` fields."""
    stack: list[Any] = []

    def make(**fields: Any) -> Served:
        context = served_checkpoint(gpt2_checkpoint, Settings(**fields))
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
