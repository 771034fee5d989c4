"""Notebook parity: TransformerLens's demo notebooks, section by section, run unchanged on a
hooklab model.

Each section (``nb_*.py``) runs once on TransformerLens 3.9 (``Served.tl``) and once on the
hooklab client connected to a real server on the same weights (``Served.model``); only the
model object differs. Every result must match within 1e-4 and every printed line must match;
a step that raises on hooklab fails its section (no step may need a change).

The short sections run on every fixture checkpoint (gpt2, llama, neox) in both deployments;
TransformerLens's own ``patching`` sweeps (one forward per patched index) on GPT-2 only.
"""

from __future__ import annotations

import pytest
from e2e.e2e_servers import Served

from . import nb_activation_patching, nb_exploratory_analysis, nb_main_demo
from .parity import Notebook, assert_parity

pytestmark = pytest.mark.slow


def _ids(sections: tuple[Notebook, ...]) -> list[str]:
    return [section.__name__ for section in sections]


@pytest.mark.parametrize("section", nb_main_demo.SECTIONS, ids=_ids(nb_main_demo.SECTIONS))
def test_main_demo(server: Served, section: Notebook) -> None:
    assert_parity(section, server.tl, server.model)


@pytest.mark.parametrize(
    "section", nb_exploratory_analysis.SECTIONS, ids=_ids(nb_exploratory_analysis.SECTIONS)
)
def test_exploratory_analysis(server: Served, section: Notebook) -> None:
    assert_parity(section, server.tl, server.model)


@pytest.mark.parametrize(
    "section", nb_activation_patching.SECTIONS, ids=_ids(nb_activation_patching.SECTIONS)
)
def test_activation_patching(gpt2_served: Served, section: Notebook) -> None:
    assert_parity(section, gpt2_served.tl, gpt2_served.model)
