"""Engine tests: the tiny offline checkpoints of ``fixtures.checkpoints`` and ``engine_helpers``."""

import sys
from pathlib import Path

import pytest

for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

pytest.register_assert_rewrite("engine_helpers", "fixtures.checkpoints", "fixtures.oracle")

from fixtures.checkpoints import (  # noqa: E402, F401  (session fixtures, used by name)
    any_checkpoint,
    gpt2_checkpoint,
    llama_checkpoint,
    neox_checkpoint,
    tokenizer_dir,
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread.

    At d_model 64 a second thread only adds synchronisation; on a shared 2-core machine it made
    the oracle modules several times slower. Opt in with ``pytest.mark.usefixtures``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
