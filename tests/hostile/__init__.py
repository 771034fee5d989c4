"""Hostile requests against a real ``hooklab-server`` subprocess (issue 8): runaway work and
resource bounds, read from outside the process (/proc RSS, sockets, /metrics, its log).

A package, like tests/e2e, so that its module names cannot clash with other test folders.
"""

import pytest

pytest.register_assert_rewrite("hostile.server_process")
