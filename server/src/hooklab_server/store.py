"""Stored tensors and caches: one interface, an in-memory implementation (the embedded default)
and a Redis one (``redis_store.py``), both held to the same tests.

Every object belongs to the account that stored it: another account gets the same 404 as for
an id that does not exist (ids are never confirmed), admins reach everything. Objects expire
after a TTL. The total size, the number of objects and each owner's bytes (its stored_bytes
quota) are capped; a put over a cap is refused, never evicting anyone's data. Every object
counts ``OBJECT_OVERHEAD`` bytes of bookkeeping per tensor and for itself, so empty tensors are
not free.
"""

from __future__ import annotations

import heapq
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from hooklab_proto import ErrorCode, dtype_code

from .auth import Account
from .ops.errors import QuotaExceeded, RequestError

Cache = dict[str, torch.Tensor]
Value = torch.Tensor | Cache
# What an object costs beyond its elements (its record, id and tensor headers), in bytes.
OBJECT_OVERHEAD = 256


@dataclass(frozen=True)
class StoredInfo:
    """What is known of a stored object without reading its tensors."""

    id: str
    kind: str  # "tensor" | "cache" | "sae" (an uploaded sparse autoencoder's weights)
    owner: str  # the name of the account that stored it
    nbytes: int  # the elements' bytes
    charged_bytes: int  # what it counts against the limits
    expires_at: float  # Unix time
    dtype: str | None = None  # a tensor's
    shape: list[int] | None = None  # a tensor's
    names: list[str] | None = None  # a cache's activation names
    # What a listing shows without reading the tensors (an uploaded SAE's config).
    details: dict[str, str | int] | None = None


@dataclass(frozen=True)
class Stored:
    info: StoredInfo
    value: Value


def new_info(
    kind: str,
    value: Value,
    owner: str,
    expires_at: float,
    details: dict[str, str | int] | None = None,
) -> StoredInfo:
    tensors = list(value.values()) if isinstance(value, dict) else [value]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    prefix = {"tensor": "t_", "sae": "sae_"}.get(kind, "c_")
    tensor = value if isinstance(value, torch.Tensor) else None
    return StoredInfo(
        id=prefix + secrets.token_hex(12),
        kind=kind,
        owner=owner,
        nbytes=nbytes,
        charged_bytes=nbytes + OBJECT_OVERHEAD * (1 + len(tensors)),
        expires_at=expires_at,
        dtype=dtype_code(tensor.dtype) if tensor is not None else None,  # the wire's codes
        shape=list(tensor.shape) if tensor is not None else None,
        names=list(value) if isinstance(value, dict) else None,
        details=details,
    )


def visible(info: StoredInfo, kind: str, caller: Account) -> bool:
    return info.kind == kind and (caller.admin or info.owner == caller.name)


def not_found(kind: str, object_id: str) -> RequestError:
    return RequestError(
        ErrorCode.NOT_FOUND,
        f"no stored {kind} {object_id[:100]!r}",
        "stored objects expire; store it again",
    )


def over_object_count(limit: int) -> RequestError:
    return RequestError(
        ErrorCode.STORE_FULL,
        f"the store holds its limit of {limit} objects (server setting max_stored_objects)",
        "delete objects you no longer need, or wait for them to expire",
    )


def over_total_bytes(info: StoredInfo, used: int, limit: int) -> RequestError:
    return RequestError(
        ErrorCode.STORE_FULL,
        f"storing {info.nbytes} bytes (+{info.charged_bytes - info.nbytes} of bookkeeping) "
        f"would exceed the store's limit of {limit} bytes ({used} in use; server setting "
        "max_stored_bytes)",
        "delete objects you no longer need, or wait for them to expire",
    )


def over_quota(info: StoredInfo, used: int, limit: int, wait: float | None) -> QuotaExceeded:
    return QuotaExceeded(
        "stored_bytes",
        f"key {info.owner!r} stores {used} bytes; {info.charged_bytes} more would pass its quota "
        f"stored_bytes of {limit}",
        "delete objects you no longer need (GET /v1/tensors and /v1/caches list them)",
        retry_after=wait,
    )


def wait_for_room(owned: Iterable[StoredInfo], excess: int, now: float) -> float | None:
    """Seconds until enough of an owner's objects expire to free ``excess`` bytes."""
    freed = 0
    for info in sorted(owned, key=lambda item: item.expires_at):
        freed += info.charged_bytes
        if freed >= excess:
            return max(0.0, info.expires_at - now)
    return None


class Store(Protocol):
    def put(
        self,
        kind: str,
        value: Value,
        owner: Account,
        ttl_s: float | None = None,
        details: dict[str, str | int] | None = None,
    ) -> StoredInfo:
        """Keep ``value`` for ``owner``; RequestError (store full) or QuotaExceeded over a cap."""
        ...

    def get(self, kind: str, object_id: str, caller: Account) -> Stored:
        """The object, or the same 404 whether it is missing or someone else's."""
        ...

    def delete(self, kind: str, object_id: str, caller: Account) -> None: ...

    def listing(self, kind: str, caller: Account) -> list[StoredInfo]:
        """The caller's objects of ``kind`` (an admin's: everyone's)."""
        ...

    def bytes_by_owner(self) -> dict[str, int]: ...


def _detached(value: Value) -> Value:
    if isinstance(value, dict):
        return {name: tensor.detach() for name, tensor in value.items()}
    return value.detach()


class MemoryStore:
    """Thread-safe in-process store (the embedded default). Puts, gets and deletes cost
    O(log n): the byte totals are running sums and expiry follows a heap."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        max_objects: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_objects = max_objects
        self.ttl_s = ttl_s
        self._clock = clock
        self._objects: dict[str, Stored] = {}
        self._expiry: list[tuple[float, str]] = []  # (expires_at, id); deleted ids are skipped
        self._used = 0
        self._owned: dict[str, int] = {}  # charged bytes per owner
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, object_id = heapq.heappop(self._expiry)
            self._remove(object_id)

    def _remove(self, object_id: str) -> None:
        stored = self._objects.pop(object_id, None)
        if stored is not None:
            self._used -= stored.info.charged_bytes
            self._owned[stored.info.owner] -= stored.info.charged_bytes

    def put(
        self,
        kind: str,
        value: Value,
        owner: Account,
        ttl_s: float | None = None,
        details: dict[str, str | int] | None = None,
    ) -> StoredInfo:
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        with self._lock:
            self._expire()
            now = self._clock()
            info = new_info(kind, value, owner.name, now + ttl, details)
            limit = owner.quotas.get("stored_bytes")
            used = self._owned.get(owner.name, 0)
            if limit is not None and used + info.charged_bytes > limit:
                owned = (s.info for s in self._objects.values() if s.info.owner == owner.name)
                wait = wait_for_room(owned, used + info.charged_bytes - limit, now)
                raise over_quota(info, used, limit, wait)
            if len(self._objects) >= self.max_objects:
                raise over_object_count(self.max_objects)
            if self._used + info.charged_bytes > self.max_bytes:
                raise over_total_bytes(info, self._used, self.max_bytes)
            self._objects[info.id] = Stored(info, _detached(value))
            heapq.heappush(self._expiry, (info.expires_at, info.id))
            self._used += info.charged_bytes
            self._owned[owner.name] = used + info.charged_bytes
            return info

    def get(self, kind: str, object_id: str, caller: Account) -> Stored:
        with self._lock:
            self._expire()
            stored = self._objects.get(object_id)
        if stored is None or not visible(stored.info, kind, caller):
            raise not_found(kind, object_id)
        return stored

    def delete(self, kind: str, object_id: str, caller: Account) -> None:
        self.get(kind, object_id, caller)
        with self._lock:
            self._remove(object_id)

    def listing(self, kind: str, caller: Account) -> list[StoredInfo]:
        with self._lock:
            self._expire()
            return [s.info for s in self._objects.values() if visible(s.info, kind, caller)]

    def bytes_by_owner(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return {owner: size for owner, size in self._owned.items() if size}
