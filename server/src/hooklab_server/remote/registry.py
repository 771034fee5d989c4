"""Which models are served, and by how many live workers: each worker registers its model (the
config and tokenizer files the API needs to validate requests without the weights) and beats
a heartbeat; the API reads both. A worker whose heartbeat ran out counts no more.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from ..auth import Account
from ..callbacks import CallbackRelay
from ..engine.shell import model_shell
from ..metrics import Family, Metrics
from ..models import ModelEntry, not_served
from ..ops import CancelToken, Operations, OpsContext
from ..redis_store import unavailable
from ..settings import Settings
from ..store import Store
from ..tensor_frames import StreamedTensors
from .executor import RemoteExecutor
from .keys import RedisKeys


class Registration(msgspec.Struct, frozen=True):
    name: str
    cfg: dict[str, Any]  # HookedConfig.to_dict()
    tokenizer_files: dict[str, str]
    registered_at: float  # when a worker first registered the model: the default is the oldest


def register(client: redis.Redis, keys: RedisKeys, registration: Registration) -> Registration:
    """Publish a model, keeping its first registration time; the registration as kept."""
    existing: Any = client.hget(keys.models, registration.name)
    if existing is not None:
        first = msgspec.msgpack.decode(existing, type=Registration).registered_at
        registration = msgspec.structs.replace(registration, registered_at=first)
    client.hset(keys.models, registration.name, msgspec.msgpack.encode(registration))
    return registration


class WorkerReport(msgspec.Struct):
    model: str
    metrics: list[Family]


def worker_report(model: str, metrics: list[Family]) -> bytes:
    return msgspec.msgpack.encode(WorkerReport(model, metrics))


def beat(
    client: redis.Redis,
    keys: RedisKeys,
    registration: Registration,
    worker: str,
    lease_s: float,
    metrics: list[Family],
) -> None:
    """One heartbeat: this worker counts as live for ``lease_s`` more seconds, and its metrics
    are reported. Registers the model again should Redis have lost it (restarted empty)."""
    now, model = time.time(), registration.name
    if not client.hexists(keys.models, model):
        register(client, keys, registration)
    report = worker_report(model, metrics)
    with client.pipeline() as pipe:
        pipe.zadd(keys.workers(model), {worker: now + lease_s})
        pipe.zremrangebyscore(keys.workers(model), "-inf", now)
        pipe.hset(keys.worker_metrics, worker, report)
        pipe.execute()


def leave(client: redis.Redis, keys: RedisKeys, model: str, worker: str) -> None:
    with client.pipeline() as pipe:
        pipe.zrem(keys.workers(model), worker)
        pipe.hdel(keys.worker_metrics, worker)
        pipe.execute()


def live_worker_metrics(client: redis.Redis, keys: RedisKeys) -> dict[str, list[Family]]:
    """The metrics each live worker last reported (reports of dead workers are dropped)."""
    try:
        found: dict[Any, Any] = client.hgetall(keys.worker_metrics)
        reports = {
            worker.decode(): msgspec.msgpack.decode(raw, type=WorkerReport)
            for worker, raw in found.items()
        }
        with client.pipeline(transaction=False) as pipe:
            for worker, report in reports.items():
                pipe.zscore(keys.workers(report.model), worker)
            expiries: list[float | None] = pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError):
        return {}  # a scrape during an outage shows the API's own series only
    now = time.time()
    live, dead = {}, []
    for (worker, report), expiry in zip(reports.items(), expiries, strict=True):
        if expiry is not None and expiry > now:
            live[worker] = report.metrics
        else:
            dead.append(worker)
    if dead:
        client.hdel(keys.worker_metrics, *dead)
    return live


@dataclass
class _Known:
    registration: Registration
    operations: Operations
    executor: RemoteExecutor


class RemoteModels:
    """The models workers serve through Redis: a weightless shell of each validates requests
    here; the workers run them. Registrations are reread at most every ``REFRESH_S``."""

    REFRESH_S = 1.0

    def __init__(
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        store: Store,
        settings: Settings,
        metrics: Metrics,
        open_account: Account,
        callbacks: CallbackRelay | None = None,
    ) -> None:
        self.redis, self.keys = client, keys
        self._callbacks = callbacks
        self._store, self._settings, self._metrics = store, settings, metrics
        self._open_account = open_account
        self._known: dict[str, _Known] = {}
        self._order: list[tuple[str, int]] = []  # (name, live workers), the default first
        self._read_at = -self.REFRESH_S
        self._lock = asyncio.Lock()

    async def _refresh(self) -> list[tuple[str, int]]:
        async with self._lock:
            if time.monotonic() - self._read_at < self.REFRESH_S:
                return self._order
            try:
                found: dict[Any, Any] = await self.redis.hgetall(self.keys.models)
                registrations = [
                    msgspec.msgpack.decode(raw, type=Registration) for raw in found.values()
                ]
                now = time.time()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for registration in registrations:
                        pipe.zcount(self.keys.workers(registration.name), now, "+inf")
                    counts: list[int] = await pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise unavailable(exc) from None
            counted = sorted(
                zip(registrations, counts, strict=True), key=lambda pair: pair[0].registered_at
            )
            for registration, _ in counted:
                self._build(registration)
            self._order = [(registration.name, live) for registration, live in counted]
            self._read_at = time.monotonic()
            return self._order

    def _build(self, registration: Registration) -> None:
        known = self._known.get(registration.name)
        if known is not None and known.registration == registration:
            return
        shell = model_shell(registration.cfg, registration.tokenizer_files)
        ctx = OpsContext(
            shell, self._store, self._settings, self._metrics, self._open_account,
            self._callbacks,
        )  # fmt: skip
        executor = RemoteExecutor(self.redis, self.keys, registration.name)
        self._known[registration.name] = _Known(registration, Operations(ctx), executor)

    def _entry(self, name: str, workers: int) -> ModelEntry:
        known = self._known[name]

        async def read_weight(
            weight: str, caller: Account, wants_json: bool, token: CancelToken
        ) -> StreamedTensors:
            return await known.executor.weight(weight, caller, wants_json, token)

        return ModelEntry(
            name, known.operations, known.executor, read_weight,
            known.registration.tokenizer_files, workers,
        )  # fmt: skip

    async def get(self, name: str | None) -> ModelEntry:
        order = await self._refresh()
        live = [(model, workers) for model, workers in order if workers]
        chosen = live[:1] if name is None else [entry for entry in live if entry[0] == name]
        if not chosen:
            raise not_served(name or "(default)", [model for model, _ in live])
        return self._entry(*chosen[0])

    async def listing(self) -> list[ModelEntry]:
        order = await self._refresh()
        live_first = sorted(order, key=lambda entry: entry[1] == 0)  # stable: oldest first
        return [self._entry(name, workers) for name, workers in live_first]

    async def problem(self) -> str | None:
        try:
            await self.redis.ping()
            order = await self._refresh()
        except Exception as exc:
            return f"redis: {type(exc).__name__}"
        if not any(workers for _, workers in order):
            return "no live worker"
        return None

    async def aclose(self) -> None:
        await self.redis.aclose()
