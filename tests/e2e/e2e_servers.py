"""Real servers for the end-to-end tests: uvicorn in a thread on a free loopback port, serving
hooklab's app over a model loaded once per checkpoint, with the real client connected to it and
TransformerLens 3.9 on the same checkpoint as the reference."""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import uvicorn

import hooklab
from fixtures.oracle import load_tl_model
from fixtures.scaled_out import ScaledOut
from hooklab_server.api import create_app
from hooklab_server.api.serving import server_config
from hooklab_server.engine import load_model
from hooklab_server.settings import Settings

# Limits of ``limited_server``: small enough to hit with a tiny request.
TINY_LIMITS = Settings(
    max_tokens=64,
    max_batch=4,
    max_request_bytes=16 * 1024,
    max_response_bytes=150_000,
    max_stored_bytes=4096,
    store_ttl_s=60.0,
)


class Served(NamedTuple):
    """A running server: its base URL, the real client connected to it, and TL on the same
    checkpoint (TransformerLens 3.9, the same weight processing as the server's defaults)."""

    url: str
    model: hooklab.HookedTransformer
    tl: Any


class RunningServer:
    """uvicorn in a daemon thread on 127.0.0.1:<free port>."""

    def __init__(self, app: Any) -> None:
        # Bound here and handed to uvicorn, so no other process can take the port in between.
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # uvicorn's own "Exception in ASGI application" log is off: hooklab logs the error before
        # answering, while uvicorn formats the traceback after the answer, in its thread, racing
        # pytest's report of the failure in the main thread (CPython 3.11's ast module keeps its
        # recursion-depth check per interpreter: "AST constructor recursion depth mismatch").
        settings = getattr(getattr(app, "state", None), "settings", None) or Settings()
        config = server_config(
            app, settings, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="uvicorn"
        )

    def start(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not shut down"


@contextmanager
def serve_app(app: Any) -> Iterator[RunningServer]:
    running = RunningServer(app).start()
    try:
        yield running
    finally:
        running.stop()


def serve(engine_model: Any, settings: Settings | None = None) -> Any:
    return serve_app(create_app(engine_model, settings or Settings()))


# ---- models, loaded once per session ---------------------------------------------------------

_engine_models: dict[Path, Any] = {}
_tl_models: dict[Path, Any] = {}


def engine_model(checkpoint: Path) -> Any:
    if checkpoint not in _engine_models:
        _engine_models[checkpoint] = load_model(str(checkpoint), device="cpu")
    return _engine_models[checkpoint]


def tl_model(checkpoint: Path) -> Any:
    if checkpoint not in _tl_models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _tl_models[checkpoint] = load_tl_model(checkpoint)
    return _tl_models[checkpoint]


@contextmanager
def served_checkpoint(checkpoint: Path, settings: Settings | None = None) -> Iterator[Served]:
    model = engine_model(checkpoint)
    if settings is not None and settings.sae:  # a model of its own, with --sae's SAEs attached
        from hooklab_server.cli import attach_configured_saes

        model = load_model(str(checkpoint), device="cpu")
        assert attach_configured_saes(model, settings, "hooklab-server")
    with (
        serve(model, settings) as running,
        _served(running.url, checkpoint) as served,
    ):
        yield served


@contextmanager
def scaled_out_checkpoint(
    checkpoint: Path, redis_url: str, folder: Path, settings: Settings | None = None
) -> Iterator[Served]:
    """The same, served scaled out: an API over Redis and two worker processes (behind API keys,
    the harness uses the one the client does: HOOKLAB_API_KEY)."""
    api_key = os.environ.get("HOOKLAB_API_KEY")
    deployment = ScaledOut(redis_url, [checkpoint], folder, settings, api_key=api_key)
    try:
        deployment.start()
        with _served(deployment.url, checkpoint) as served:
            yield served
    finally:
        deployment.stop()


@contextmanager
def _served(url: str, checkpoint: Path) -> Iterator[Served]:
    client = hooklab.connect(url)
    try:
        yield Served(url, client, tl_model(checkpoint))
    finally:
        client.close()


# ---- inputs ----------------------------------------------------------------------------------

PROMPTS = ["def f(x): return x + 1", "The license of this file is"]


def sample_tokens(tl: Any, batch: int = 2, pos: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tl.cfg.d_vocab, (batch, pos), generator=generator)
