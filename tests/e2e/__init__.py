"""End-to-end tests: a real uvicorn server over loopback, the real client, TL 3.9 as reference.

A package, so that its modules (``e2e.test_bad_input``, ``e2e.test_tl_parity`` …) do not clash
with the same basenames in tests/proto and tests/engine.
"""

import pytest

pytest.register_assert_rewrite("e2e.e2e_helpers", "e2e.e2e_servers")
