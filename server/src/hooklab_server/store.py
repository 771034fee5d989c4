"""Stored tensors and caches: a small interface with an in-memory implementation.

Every object belongs to the account that stored it: another account gets the same 404 as for
an id that does not exist (ids are never confirmed), admins reach everything. Objects expire
after a TTL. The total size, the number of objects and each owner's bytes (its stored_bytes
quota) are capped; a put over a cap is refused, never evicting anyone's data. Every object
counts ``OBJECT_OVERHEAD`` bytes of bookkeeping, so empty tensors are not free. A Redis-backed
store can implement the same interface.
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from hooklab_proto import ErrorCode

from .auth import Account
from .ops.errors import QuotaExceeded, RequestError

Cache = dict[str, torch.Tensor]
# What an object costs beyond its elements (its record, id and tensor headers), in bytes.
OBJECT_OVERHEAD = 256


@dataclasses.dataclass(frozen=True)
class Stored:
    id: str
    kind: str  # "tensor" | "cache"
    value: torch.Tensor | Cache
    nbytes: int  # the elements' bytes
    expires_at: float
    owner: str  # the name of the account that stored it

    @property
    def charged_bytes(self) -> int:
        """What the object counts against the store's limit."""
        count = len(self.value) if isinstance(self.value, dict) else 1
        return self.nbytes + OBJECT_OVERHEAD * (1 + count)


def nbytes_of(value: torch.Tensor | Cache) -> int:
    tensors = value.values() if isinstance(value, dict) else [value]
    return sum(t.numel() * t.element_size() for t in tensors)


class Store(Protocol):
    def put(
        self, kind: str, value: torch.Tensor | Cache, owner: Account, ttl_s: float | None = None
    ) -> Stored: ...
    def get(self, kind: str, object_id: str, caller: Account) -> Stored: ...
    def delete(self, kind: str, object_id: str, caller: Account) -> None: ...
    def listing(self, kind: str, caller: Account) -> list[Stored]: ...
    def bytes_by_owner(self) -> dict[str, int]: ...
    def remaining_s(self, stored: Stored) -> float: ...


class MemoryStore:
    """Thread-safe in-process store (the embedded default). Puts, gets and deletes cost
    O(log n): the byte total is kept as a running sum and expiry uses a heap."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        max_objects: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_objects = max_objects
        self.ttl_s = ttl_s
        self._clock = clock
        self._objects: dict[str, Stored] = {}
        self._expiry: list[tuple[float, str]] = []  # (expires_at, id); stale entries skipped
        self._used = 0
        self._owned: dict[str, int] = {}  # charged bytes per owner
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            self._expire()
            return self._used

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._objects)

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, object_id = heapq.heappop(self._expiry)
            stored = self._objects.get(object_id)
            if stored is not None and stored.expires_at <= now:
                self._remove(object_id)

    def _remove(self, object_id: str) -> None:
        stored = self._objects.pop(object_id, None)
        if stored is not None:
            self._used -= stored.charged_bytes
            self._owned[stored.owner] -= stored.charged_bytes

    def put(
        self, kind: str, value: torch.Tensor | Cache, owner: Account, ttl_s: float | None = None
    ) -> Stored:
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        prefix = "t_" if kind == "tensor" else "c_"
        stored = Stored(
            prefix + secrets.token_hex(12), kind, _detached(value), nbytes_of(value), 0.0,
            owner.name,
        )  # fmt: skip
        size = stored.charged_bytes
        with self._lock:
            self._expire()
            self._check_quota(owner, size)
            if len(self._objects) >= self.max_objects:
                raise RequestError(
                    ErrorCode.STORE_FULL,
                    f"the store holds its limit of {self.max_objects} objects "
                    "(server setting max_stored_objects)",
                    "delete objects you no longer need, or wait for them to expire",
                )
            if self._used + size > self.max_bytes:
                raise RequestError(
                    ErrorCode.STORE_FULL,
                    f"storing {stored.nbytes} bytes (+{size - stored.nbytes} of bookkeeping) "
                    f"would exceed the store's limit of {self.max_bytes} bytes ({self._used} in "
                    "use; server setting max_stored_bytes)",
                    "delete objects you no longer need, or wait for them to expire",
                )
            stored = dataclasses.replace(stored, expires_at=self._clock() + ttl)
            self._objects[stored.id] = stored
            self._used += size
            self._owned[owner.name] = self._owned.get(owner.name, 0) + size
            heapq.heappush(self._expiry, (stored.expires_at, stored.id))
            return stored

    def _check_quota(self, owner: Account, size: int) -> None:
        limit = owner.quotas.get("stored_bytes")
        used = self._owned.get(owner.name, 0)
        if limit is None or used + size <= limit:
            return
        # Waiting helps when enough of the owner's objects expire to make room.
        excess, freed, wait = used + size - limit, 0, None
        for item in sorted(
            (item for item in self._objects.values() if item.owner == owner.name),
            key=lambda item: item.expires_at,
        ):
            freed += item.charged_bytes
            if freed >= excess:
                wait = item.expires_at - self._clock()
                break
        raise QuotaExceeded(
            "stored_bytes",
            f"key {owner.name!r} stores {used} bytes; {size} more would pass its quota "
            f"stored_bytes of {limit}",
            "delete objects you no longer need (GET /v1/tensors and /v1/caches list them)",
            retry_after=wait,
        )

    def get(self, kind: str, object_id: str, caller: Account) -> Stored:
        with self._lock:
            self._expire()
            stored = self._objects.get(object_id)
        visible = stored is not None and (caller.admin or stored.owner == caller.name)
        if stored is None or stored.kind != kind or not visible:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"no stored {kind} {object_id[:100]!r}",
                "stored objects expire; store it again",
            )
        return stored

    def delete(self, kind: str, object_id: str, caller: Account) -> None:
        self.get(kind, object_id, caller)
        with self._lock:
            self._remove(object_id)

    def listing(self, kind: str, caller: Account) -> list[Stored]:
        """The caller's objects of ``kind`` (an admin's: everyone's), oldest first."""
        with self._lock:
            self._expire()
            return [
                item
                for item in self._objects.values()
                if item.kind == kind and (caller.admin or item.owner == caller.name)
            ]

    def bytes_by_owner(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return {owner: size for owner, size in self._owned.items() if size}

    def remaining_s(self, stored: Stored) -> float:
        return max(0.0, stored.expires_at - self._clock())


def _detached(value: torch.Tensor | Cache) -> torch.Tensor | Cache:
    if isinstance(value, dict):
        return {name: tensor.detach() for name, tensor in value.items()}
    return value.detach()
