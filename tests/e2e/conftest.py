"""End-to-end fixtures: a real uvicorn server on a free loopback port, the real client, and
TransformerLens 3.9 on the same weights as the reference (``e2e_servers``).

One server per checkpoint lives for the whole session (``gpt2_server``, ``llama_server``,
``neox_server``, and ``server`` parametrised over them), in each deployment: embedded, and
scaled out over Redis with two worker processes (``deployment``), so every test using them
runs against both; so do ``limited_server``, ``make_server`` and servers made with ``serve_in``.
The scheduler's own tests (merged forwards, the decode pool) keep an embedded server: they
watch one process's batching, which scaled out happens inside each worker.

``limited_server`` is a fresh server per test with tiny limits (tokens, batch, body and response
size, store bytes); ``make_server`` starts servers with any other ``Settings``. Every server is
stopped, and its thread joined, when its fixture ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.redis_server import RedisServer, running_redis
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
    with running_redis(tmp_path_factory.mktemp("e2e-redis")) as server:
        yield server


ServeIn = Callable[[Path, Settings | None], AbstractContextManager[Served]]


@pytest.fixture(scope="session")
def serve_in(request: pytest.FixtureRequest, deployment: str) -> ServeIn:
    """``serve_in(checkpoint, settings)``: a context serving the checkpoint in this session's
    deployment (scaled out: a fresh key prefix and two workers with the same settings)."""

    @contextmanager
    def serve(checkpoint: Path, settings: Settings | None = None) -> Iterator[Served]:
        if deployment == "embedded":
            with served_checkpoint(checkpoint, settings) as served:
                yield served
            return
        redis_url = request.getfixturevalue("e2e_redis").url
        folder = request.getfixturevalue("tmp_path_factory").mktemp(f"{checkpoint.name}-workers")
        with scaled_out_checkpoint(checkpoint, redis_url, folder, settings) as served:
            yield served

    return serve


@pytest.fixture(scope="session")
def gpt2_server(serve_in: ServeIn, gpt2_checkpoint: Path) -> Iterator[Served]:
    with serve_in(gpt2_checkpoint, None) as served:
        yield served


@pytest.fixture(scope="session")
def llama_server(serve_in: ServeIn, llama_checkpoint: Path) -> Iterator[Served]:
    with serve_in(llama_checkpoint, None) as served:
        yield served


@pytest.fixture(scope="session")
def neox_server(serve_in: ServeIn, neox_checkpoint: Path) -> Iterator[Served]:
    with serve_in(neox_checkpoint, None) as served:
        yield served


SERVER_ARCHS = ("gpt2", "llama", "neox")


@pytest.fixture(params=SERVER_ARCHS)
def server(request: pytest.FixtureRequest, deployment: str) -> Served:
    """Each session server in turn (ids gpt2, llama, neox), in each deployment."""
    served: Served = request.getfixturevalue(f"{request.param}_server")
    served.model.reset_hooks()  # a failed test must not leave hooks on the shared client
    return served


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
