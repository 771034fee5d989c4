"""The session servers (tests/fixtures/served.py, shared with tests/e2e): each checkpoint served
in each deployment, the real client, and TransformerLens 3.9 on the same weights."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.e2e_servers import Served


@pytest.fixture
def gpt2_served(gpt2_server: Served) -> Iterator[Served]:
    """The GPT-2 checkpoint alone (both deployments), for the long patching sweeps."""
    gpt2_server.model.reset_hooks()
    yield gpt2_server
