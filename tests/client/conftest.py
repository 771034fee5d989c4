"""Client tests: hooklab's ActivationCache, FactoredMatrix and utils against TransformerLens 3.9.

The ``model`` behind a hooklab cache here is the server's engine (it has the duck-typed API the
client's cache relies on); the reference is TransformerLens 3.9 on the same checkpoint.
"""

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

pytest.register_assert_rewrite("client_helpers")
