"""The Store contract, held by both stores alike: the in-memory one (embedded) and the Redis one
(scaled out) — ownership, listing, expiry, limits, quotas and exact values."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch

from hooklab_proto import ErrorCode
from hooklab_server.auth import Account
from hooklab_server.ops.errors import QuotaExceeded, RequestError
from hooklab_server.redis_store import RedisStore
from hooklab_server.store import OBJECT_OVERHEAD, MemoryStore, Store

ALICE = Account("alice", quotas={"stored_bytes": 10_000})
BOB = Account("bob", quotas={"stored_bytes": 10_000})
ADMIN = Account("root", admin=True)
MakeStore = Callable[..., Store]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> MakeStore:
    """``make_store(max_bytes=…, ttl_s=…, max_objects=…)``: an empty store of the kind."""

    def make(max_bytes: int = 1_000_000, ttl_s: float = 3600.0, max_objects: int = 100) -> Store:
        if request.param == "memory":
            return MemoryStore(max_bytes, ttl_s, max_objects)
        client: redis.Redis = request.getfixturevalue("clean_redis")
        return RedisStore(client, max_bytes, ttl_s, max_objects)

    return make


def code_of(error: pytest.ExceptionInfo[RequestError]) -> ErrorCode:
    return error.value.code


def test_values_come_back_exactly_every_dtype(make_store: MakeStore) -> None:
    store = make_store()
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.tensor([[1, -2], [2**40, 7]]),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    for name, tensor in tensors.items():
        info = store.put("tensor", tensor, ALICE)
        got = store.get("tensor", info.id, ALICE).value
        assert isinstance(got, torch.Tensor)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert info.shape == list(tensor.shape) and info.owner == "alice"
    cache = {"blocks.0.hook_resid_post": torch.randn(1, 3, 8), "hook_embed": torch.randn(1, 3, 8)}
    info = store.put("cache", cache, ALICE)
    got_cache = store.get("cache", info.id, ALICE).value
    assert isinstance(got_cache, dict) and set(got_cache) == set(cache)
    assert all(torch.equal(got_cache[name], cache[name]) for name in cache)
    assert info.names == list(cache)


def test_another_key_gets_the_404_of_a_missing_id(make_store: MakeStore) -> None:
    store = make_store()
    info = store.put("tensor", torch.ones(3), ALICE)
    with pytest.raises(RequestError) as missing:
        store.get("tensor", "t_0000000000000000", BOB)
    with pytest.raises(RequestError) as others:
        store.get("tensor", info.id, BOB)
    assert code_of(others) == code_of(missing) == ErrorCode.NOT_FOUND
    assert others.value.message.replace(info.id, "ID") == missing.value.message.replace(
        "t_0000000000000000", "ID"
    )
    with pytest.raises(RequestError):
        store.delete("tensor", info.id, BOB)
    assert torch.equal(store.get("tensor", info.id, ALICE).value, torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(RequestError):
        store.get("cache", info.id, ALICE)  # a tensor is not a cache
    assert torch.equal(store.get("tensor", info.id, ADMIN).value, torch.ones(3))  # type: ignore[arg-type]
    store.delete("tensor", info.id, ADMIN)
    with pytest.raises(RequestError):
        store.get("tensor", info.id, ALICE)


def test_listings_show_ones_own_and_admins_everything(make_store: MakeStore) -> None:
    store = make_store()
    mine = store.put("tensor", torch.ones(2), ALICE).id
    theirs = store.put("tensor", torch.ones(2), BOB).id
    cache = store.put("cache", {"hook_embed": torch.ones(1, 2, 2)}, ALICE).id
    assert {i.id for i in store.listing("tensor", ALICE)} == {mine}
    assert {i.id for i in store.listing("tensor", BOB)} == {theirs}
    assert {i.id for i in store.listing("cache", ALICE)} == {cache}
    assert {i.id for i in store.listing("tensor", ADMIN)} == {mine, theirs}


def test_objects_expire_and_their_bytes_return(make_store: MakeStore) -> None:
    store = make_store(ttl_s=60)
    short = store.put("tensor", torch.ones(10), ALICE, ttl_s=0.5)
    kept = store.put("tensor", torch.ones(10), ALICE)
    assert store.bytes_by_owner()["alice"] == short.charged_bytes + kept.charged_bytes
    time.sleep(0.8)
    with pytest.raises(RequestError):
        store.get("tensor", short.id, ALICE)
    assert [i.id for i in store.listing("tensor", ALICE)] == [kept.id]
    assert store.bytes_by_owner()["alice"] == kept.charged_bytes
    assert kept.expires_at - time.time() > 50  # capped by the store's TTL, not the request's


def test_limits_and_quotas(make_store: MakeStore) -> None:
    store = make_store(max_bytes=6000, max_objects=3)
    vector = torch.ones(500)  # 2000 bytes + 2 x 256 of bookkeeping
    charged = 2000 + 2 * OBJECT_OVERHEAD
    first = store.put("tensor", vector, ALICE)
    assert first.charged_bytes == charged
    store.put("tensor", vector, BOB)
    with pytest.raises(RequestError) as full:
        store.put("tensor", vector, BOB)  # 3 x 2512 > 6000
    assert code_of(full) == ErrorCode.STORE_FULL and "max_stored_bytes" in full.value.message
    tiny = Account("tiny", quotas={"stored_bytes": 3000})
    store.delete("tensor", first.id, ALICE)
    store.put("tensor", vector, tiny)
    with pytest.raises(QuotaExceeded) as quota:
        store.put("tensor", torch.ones(10), tiny)
    assert quota.value.quota == "stored_bytes" and quota.value.retry_after is not None
    store.put("tensor", torch.zeros(0), ALICE)  # empty tensors are not free: they count
    with pytest.raises(RequestError) as count:
        store.put("tensor", torch.zeros(0), ALICE)
    assert code_of(count) == ErrorCode.STORE_FULL and "max_stored_objects" in count.value.message


def test_concurrent_puts_never_pass_the_limit(make_store: MakeStore) -> None:
    store = make_store(max_bytes=20 * (400 + 2 * OBJECT_OVERHEAD), max_objects=1000)
    unlimited = Account("alice")  # no quota of its own: the store's limit is the one tested
    accepted: list[str] = []

    def put() -> None:
        for _ in range(10):
            with contextlib.suppress(RequestError):  # refused once full: counted below
                accepted.append(store.put("tensor", torch.ones(100), unlimited).id)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 20
    assert store.bytes_by_owner()["alice"] == 20 * (400 + 2 * OBJECT_OVERHEAD)


def test_a_redis_outage_is_unavailable_not_a_crash(tmp_path: object) -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    store = RedisStore(client, 10_000, 60)
    with pytest.raises(RequestError) as down:
        store.put("tensor", torch.ones(2), ALICE)
    assert code_of(down) == ErrorCode.UNAVAILABLE
