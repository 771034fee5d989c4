"""API keys: a JSON file of key hashes (never the keys), the accounts they open, and the
``hooklab-server keys`` commands that manage it.

A key is ``hl_<id>_<secret>``. The file keeps each key's name, id, SHA-256 hash, admin flag and
quota overrides; a presented key is found by its id and accepted when its hash matches
(``hmac.compare_digest``: constant time). Keys are random 256-bit secrets, so a plain hash is
enough (no password stretching). The server re-reads the file when it changes, so a revoked key
stops working without a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_PREFIX = "hl_"
_KEY = re.compile(r"^hl_([A-Za-z0-9]{8})_[A-Za-z0-9_-]{20,100}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OPEN_NAME = "open"  # the account every request uses when no keys are configured
RELOAD_EVERY_S = 0.5


@dataclass(frozen=True)
class Account:
    """Who a request acts for: a key's name (never the key), admin rights and quotas."""

    name: str
    admin: bool = False
    quotas: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyRecord:
    name: str
    id: str
    hash: str
    admin: bool
    quotas: dict[str, int]
    created: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "id": self.id, "hash": self.hash, "admin": self.admin,
            "quotas": self.quotas, "created": self.created,
        }  # fmt: skip


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> list[KeyRecord]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [
        KeyRecord(
            item["name"],
            item["id"],
            item["hash"],
            bool(item.get("admin", False)),
            {str(k): int(v) for k, v in item.get("quotas", {}).items()},
            item.get("created", ""),
        )
        for item in data.get("keys", [])
    ]


def write_keys(path: Path, records: Sequence[KeyRecord]) -> None:
    """Atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = json.dumps({"version": 1, "keys": [r.as_dict() for r in records]}, indent=2)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(body + "\n")
    os.replace(temporary, path)


def new_key() -> tuple[str, str]:
    """(key id, key): the id is public (it finds the record), the rest is the secret."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(8))
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


class KeyRing:
    """The accounts of a keys file, re-read when the file changes."""

    def __init__(
        self,
        path: str | Path,
        default_quotas: Mapping[str, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path else None
        self.default_quotas = dict(default_quotas)
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, KeyRecord] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = -RELOAD_EVERY_S
        self._reload()

    @property
    def enabled(self) -> bool:
        """Keys are configured: every /v1 request needs one."""
        return self.path is not None and bool(self._current())

    def open_account(self) -> Account:
        """Without keys the server has one trusted user (a loopback bind, or an operator's
        --insecure-open): no quotas, only the server's own limits."""
        return Account(OPEN_NAME, admin=True)

    def account(self, record: KeyRecord) -> Account:
        return Account(record.name, record.admin, {**self.default_quotas, **record.quotas})

    def accounts(self) -> list[Account]:
        return [self.account(record) for record in self._current().values()]

    def authenticate(self, key: str) -> Account | None:
        match = _KEY.match(key)
        record = self._current().get(match.group(1)) if match else None
        # Compare even when no record matched, so a miss costs what a hit costs.
        expected = record.hash if record is not None else _digest("")
        if hmac.compare_digest(_digest(key), expected) and record is not None:
            return self.account(record)
        return None

    def _current(self) -> dict[str, KeyRecord]:
        now = self._clock()
        if now - self._checked >= RELOAD_EVERY_S:
            self._reload()
            self._checked = now
        return self._by_id

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            status = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (status.st_mtime, status.st_size)
        with self._lock:
            if stamp == self._stamp and self._stamp is not None:
                return
            self._by_id = {r.id: r for r in read_keys(self.path)} if stamp is not None else {}
            self._stamp = stamp


# --- ``hooklab-server keys ...`` ------------------------------------------------------------


def _quota(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not QUOTA=POSITIVE_INTEGER")
    return name.strip(), int(value)


def keys_main(argv: Sequence[str], keys_file: str, quota_names: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hooklab-server keys",
        description="Manage API keys. The file keeps only hashes; a new key is shown once.",
    )
    parser.add_argument(
        "--keys-file", default=keys_file, help="default: the keys_file setting (HOOKLAB_KEYS_FILE)"
    )
    # --keys-file may also follow the command (hooklab-server keys add NAME --keys-file F).
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--keys-file", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key and print it (once)", parents=[after])
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may list, read and delete everything")
    add.add_argument(
        "--quota", type=_quota, action="append", default=[], metavar="QUOTA=VALUE",
        help=f"override a quota ({', '.join(quota_names)}); repeatable",
    )  # fmt: skip
    commands.add_parser(
        "list", help="names, admin flags and quota overrides (never keys)", parents=[after]
    )
    revoke = commands.add_parser(
        "revoke", help="delete a key: it stops working within a second", parents=[after]
    )
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    if not args.keys_file:
        parser.error("no keys file: pass --keys-file PATH or set HOOKLAB_KEYS_FILE")
    path = Path(args.keys_file).expanduser()
    records = read_keys(path)
    if args.command == "list":
        for r in records:
            quotas = " ".join(f"{k}={v}" for k, v in sorted(r.quotas.items()))
            print(f"{r.name}\t{'admin' if r.admin else 'user'}\t{r.created}\t{quotas}".rstrip())
        return 0
    if args.command == "revoke":
        kept = [r for r in records if r.name != args.name]
        if len(kept) == len(records):
            parser.error(f"no key named {args.name!r}")
        write_keys(path, kept)
        return 0
    if not _NAME.match(args.name):
        parser.error(f"{args.name!r}: names are 1-64 letters, digits, '.', '_' or '-'")
    if any(r.name == args.name for r in records):
        parser.error(f"a key named {args.name!r} exists; revoke it first")
    unknown = [name for name, _ in args.quota if name not in quota_names]
    if unknown:
        parser.error(f"unknown quota {unknown[0]!r}; one of {', '.join(quota_names)}")
    key_id, key = new_key()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = KeyRecord(args.name, key_id, _digest(key), args.admin, dict(args.quota), created)
    write_keys(path, [*records, record])
    print(key)
    return 0
