"""Stored tensors and caches: a small interface with an in-memory implementation.

Objects expire after a TTL; the total size is capped, and a put that would exceed the cap is
refused (never evicting another user's data). A Redis-backed store can implement the same
interface.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hooklab_proto import ErrorCode

from .ops.errors import RequestError

Cache = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stored:
    id: str
    kind: str  # "tensor" | "cache"
    value: torch.Tensor | Cache
    nbytes: int
    expires_at: float


def nbytes_of(value: torch.Tensor | Cache) -> int:
    tensors = value.values() if isinstance(value, dict) else [value]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class Store(Protocol):
    def put(self, kind: str, value: torch.Tensor | Cache, ttl_s: float | None = None) -> Stored: ...
    def get(self, kind: str, object_id: str) -> Stored: ...
    def delete(self, kind: str, object_id: str) -> None: ...
    def remaining_s(self, stored: Stored) -> float: ...


class MemoryStore:
    """Thread-safe in-process store (the embedded default)."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._objects: dict[str, Stored] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            self._expire()
            return sum(item.nbytes for item in self._objects.values())

    def _expire(self) -> None:
        now = self._clock()
        for key in [key for key, item in self._objects.items() if item.expires_at <= now]:
            del self._objects[key]

    def put(self, kind: str, value: torch.Tensor | Cache, ttl_s: float | None = None) -> Stored:
        size = nbytes_of(value)
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        with self._lock:
            self._expire()
            used = sum(item.nbytes for item in self._objects.values())
            if used + size > self.max_bytes:
                raise RequestError(
                    ErrorCode.STORE_FULL,
                    f"storing {size} bytes would exceed the store's limit of {self.max_bytes} "
                    f"bytes ({used} in use)",
                    "delete objects you no longer need, or wait for them to expire",
                    status=507,
                )
            prefix = "t_" if kind == "tensor" else "c_"
            stored = Stored(
                prefix + secrets.token_hex(8), kind, _detached(value), size, self._clock() + ttl
            )
            self._objects[stored.id] = stored
            return stored

    def get(self, kind: str, object_id: str) -> Stored:
        with self._lock:
            self._expire()
            stored = self._objects.get(object_id)
        if stored is None or stored.kind != kind:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"no stored {kind} {object_id!r}",
                "stored objects expire; store it again",
                status=404,
            )
        return stored

    def delete(self, kind: str, object_id: str) -> None:
        self.get(kind, object_id)
        with self._lock:
            self._objects.pop(object_id, None)

    def remaining_s(self, stored: Stored) -> float:
        return max(0.0, stored.expires_at - self._clock())


def _detached(value: torch.Tensor | Cache) -> torch.Tensor | Cache:
    if isinstance(value, dict):
        return {name: tensor.detach() for name, tensor in value.items()}
    return value.detach()
