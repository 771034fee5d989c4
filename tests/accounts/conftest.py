"""The keyed server shared by the accounts tests (package scope: started once for the folder).

Keys, all made with the real ``hooklab-server keys add`` before the server starts (one CLI call
each, ~2-3 s apiece: the CLI imports torch):

=========  =============================================  ========================================
name       made with                                      used by
=========  =============================================  ========================================
alice      (defaults)                                     isolation (A), metrics, access log
bob        (defaults)                                     isolation (B), metrics, access log
root       ``--admin``                                    admin listing / reading / deleting, usage
revoked    (defaults)                                     revoked through the CLI while running
conc       ``--quota concurrent_requests=1``              two overlapping requests
tpm        ``--quota tokens_per_minute=40``               token accounting and its 429
store      ``--quota stored_bytes=8192``                  storing until 429, delete, store again
newtok     ``--quota max_new_tokens=5``                   generate asking for 6
patchfwd   ``--quota max_patching_forwards=20``           a per-key value *above* the default
=========  =============================================  ========================================

The server-wide quota defaults are given explicitly (``--quota-<name>``), so every key's limits
are known; ``max_patching_forwards`` is 8 server-wide, which is how the server-wide default is
exercised (alice asking 16 forwards gets 429, patchfwd's 20 overrides it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile.server_process import ServerProcess

from .harness import Accounts, add_key

DEFAULT_QUOTAS: dict[str, int] = {
    "concurrent_requests": 4,
    "tokens_per_minute": 1_000_000,
    "stored_bytes": 64 * 2**20,
    "max_new_tokens": 256,
    "max_patching_forwards": 8,
}
KEYS: dict[str, dict[str, int]] = {  # name -> its one per-key quota (empty: defaults)
    "alice": {},
    "bob": {},
    "root": {},
    "revoked": {},
    "conc": {"concurrent_requests": 1},
    "tpm": {"tokens_per_minute": 40},
    "store": {"stored_bytes": 8192},
    "newtok": {"max_new_tokens": 5},
    "patchfwd": {"max_patching_forwards": 20},
}
ADMINS = {"root"}

SETTINGS: dict[str, str] = {
    "device": "cpu",
    "request_timeout_s": "60",
    **{f"quota_{name}": str(value) for name, value in DEFAULT_QUOTAS.items()},
}


@pytest.fixture(scope="package")
def accounts(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accounts]:
    """The keyed ``hooklab-server`` over the tiny GPT-2, with the keys above."""
    folder = tmp_path_factory.mktemp("accounts")
    keys_file = folder / "keys.json"
    keys = {
        name: add_key(keys_file, name, admin=name in ADMINS, quota=quota or None)
        for name, quota in KEYS.items()
    }
    server = ServerProcess(
        gpt2_checkpoint, folder / "server.log", {**SETTINGS, "keys_file": str(keys_file)}
    )
    server.start()
    state = Accounts(
        server=server,
        keys_file=keys_file,
        keys=keys,
        admins=set(ADMINS),
        quotas={name: dict(quota) for name, quota in KEYS.items()},
        defaults=dict(DEFAULT_QUOTAS),
    )
    state.secrets.extend(keys.values())
    try:
        yield state
    finally:
        state.close()
        server.stop()
