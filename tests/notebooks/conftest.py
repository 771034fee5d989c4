"""The e2e servers, shared with this folder: each checkpoint (gpt2, llama, neox) served in each
deployment (embedded, and scaled out over Redis), the real client, and TransformerLens 3.9 on the
same weights (``Served.tl``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Re-exported so that pytest finds them here too (fixtures are per-folder).
from e2e.conftest import (
    deployment,
    e2e_redis,
    gpt2_server,
    llama_server,
    neox_server,
    serve_in,
    server,
)
from e2e.e2e_servers import Served

__all__ = [
    "deployment",
    "e2e_redis",
    "gpt2_served",
    "gpt2_server",
    "llama_server",
    "neox_server",
    "serve_in",
    "server",
]


@pytest.fixture
def gpt2_served(gpt2_server: Served) -> Iterator[Served]:
    """The GPT-2 checkpoint alone (both deployments), for the long patching sweeps."""
    gpt2_server.model.reset_hooks()
    yield gpt2_server
