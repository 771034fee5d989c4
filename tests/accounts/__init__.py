"""Accounts, isolation, quotas and observability (issue 9) against a real ``hooklab-server``
subprocess (tests/hostile/server_process.py) whose keys file is made by the real CLI
(``hooklab-server keys add``), through the real client and raw httpx.

A package, like tests/hostile, so that its module names cannot clash with other test folders.
"""

import pytest

pytest.register_assert_rewrite("accounts.harness")
