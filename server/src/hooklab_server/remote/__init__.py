"""Scaled out over Redis: the API tier hands validated jobs to ``hooklab-worker`` processes, one
model on one device each, through Redis Streams (``jobs``: the messages; ``executor``: the API's
side of the execution seam; ``worker``: the workers'; ``registry``: which models are served, by
how many live workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..auth import KeyRing
    from ..settings import Settings

# A running slot outlives a crashed API process by this much past the longest request.
QUOTA_LEASE_MARGIN_S = 60.0


def scaled_out_app(settings: Settings, keys: KeyRing) -> FastAPI:
    """The stateless API tier: stored objects, quotas and jobs in Redis at ``redis_url``."""
    import redis
    import redis.asyncio as aioredis

    from ..api import create_app
    from ..metrics import Metrics
    from ..redis_quotas import RedisQuotas
    from ..redis_store import RedisStore
    from .callbacks import RedisCallbackRelay, RedisCallbackSessions
    from .keys import CLIENT_OPTIONS, RedisKeys
    from .registry import RemoteModels, live_worker_metrics

    client = redis.Redis.from_url(settings.redis_url, **CLIENT_OPTIONS)
    prefix = settings.redis_prefix
    store = RedisStore(
        client, settings.max_stored_bytes, settings.store_ttl_s, settings.max_stored_objects,
        prefix,
    )  # fmt: skip
    quotas = RedisQuotas(client, prefix, lease_s=settings.max_timeout_s + QUOTA_LEASE_MARGIN_S)
    keys_of = RedisKeys(prefix)
    metrics = Metrics(from_workers=lambda: live_worker_metrics(client, keys_of))
    async_client = aioredis.Redis.from_url(settings.redis_url, **CLIENT_OPTIONS)
    models = RemoteModels(
        async_client, keys_of, store, settings, metrics, keys.open_account(),
        RedisCallbackRelay(client, keys_of),
    )  # fmt: skip
    # Callback sessions block on their call lists: a client of their own, no socket timeout.
    callbacks_client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0)
    return create_app(
        None, settings, store, keys=keys, models=models, quotas=quotas, metrics=metrics,
        callback_sessions=RedisCallbackSessions(callbacks_client, keys_of),
    )  # fmt: skip
