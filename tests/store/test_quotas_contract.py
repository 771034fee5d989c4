"""The Quotas contract, held by the in-memory quotas (one API process) and the Redis ones
(shared by API processes) alike: running slots, the sliding one-minute token window, settling,
the wait a refusal names, and slots that come back when their holder died."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import redis

from hooklab_server.auth import Account
from hooklab_server.ops.errors import QuotaExceeded
from hooklab_server.quotas import MemoryQuotas, Quotas
from hooklab_server.redis_quotas import RedisQuotas

LIMITED = Account("alice", quotas={"concurrent_requests": 2, "tokens_per_minute": 100})
OTHER = Account("bob", quotas={"concurrent_requests": 2, "tokens_per_minute": 100})
OPEN = Account("open")


class Clock:
    """A settable clock starting at a realistic Unix time (the Redis quotas share it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.25

    def __call__(self) -> float:
        return self.now


MakeQuotas = Callable[..., Quotas]


@pytest.fixture(params=["memory", "redis"])
def make_quotas(request: pytest.FixtureRequest) -> Callable[[Clock], Quotas]:
    def make(clock: Clock, lease_s: float = 600.0) -> Quotas:
        if request.param == "memory":
            return MemoryQuotas(clock)
        client: redis.Redis = request.getfixturevalue("clean_redis")
        return RedisQuotas(client, "test", lease_s=lease_s, clock=clock)

    return make


def refusal(quotas: Quotas, account: Account, tokens: int) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(account, tokens)
    return refused.value


def test_running_slots_are_held_until_released(make_quotas: MakeQuotas) -> None:
    quotas = make_quotas(Clock())
    first, second = quotas.admit(LIMITED, 1), quotas.admit(LIMITED, 1)
    error = refusal(quotas, LIMITED, 1)
    assert error.quota == "concurrent_requests" and error.retry_after == 1.0
    assert "2 requests running" in error.message
    assert quotas.usage(LIMITED)["concurrent_requests"] == 2
    quotas.admit(OTHER, 1).release()  # other keys are not affected
    first.release()
    first.release()  # a second release frees nothing more
    assert quotas.usage(LIMITED)["concurrent_requests"] == 1
    quotas.admit(LIMITED, 1)
    second.release()
    assert quotas.usage(LIMITED)["concurrent_requests"] == 1


def test_tokens_leave_the_window_after_a_minute(make_quotas: MakeQuotas) -> None:
    clock = Clock()
    quotas = make_quotas(clock)
    quotas.admit(LIMITED, 30).release()
    clock.now += 20
    quotas.admit(LIMITED, 50).release()
    assert quotas.usage(LIMITED)["tokens_last_minute"] == 80
    error = refusal(quotas, LIMITED, 40)
    assert error.quota == "tokens_per_minute"
    # 20 too many: the first charge (30) frees them when it leaves, 40 s from now.
    assert error.retry_after == pytest.approx(40.0, abs=1e-3)
    assert quotas.usage(LIMITED)["tokens_last_minute"] == 80  # the refusal charged nothing
    clock.now += 40.01
    assert quotas.usage(LIMITED)["tokens_last_minute"] == 50
    quotas.admit(LIMITED, 40).release()
    clock.now += 60
    assert quotas.usage(LIMITED)["tokens_last_minute"] == 0


def test_a_request_larger_than_the_quota_is_told_waiting_never_helps(
    make_quotas: MakeQuotas,
) -> None:
    quotas = make_quotas(Clock())
    error = refusal(quotas, LIMITED, 101)
    assert error.quota == "tokens_per_minute" and error.retry_after is None
    assert "101 tokens" in error.message


def test_settle_corrects_the_charge_to_what_ran(make_quotas: MakeQuotas) -> None:
    quotas = make_quotas(Clock())
    admission = quotas.admit(LIMITED, 90)
    admission.settle(12)
    assert admission.tokens == 12
    assert quotas.usage(LIMITED)["tokens_last_minute"] == 12
    admission.release()
    quotas.admit(LIMITED, 88).release()


def test_open_accounts_are_counted_but_never_refused(make_quotas: MakeQuotas) -> None:
    quotas = make_quotas(Clock())
    held = [quotas.admit(OPEN, 10**9) for _ in range(20)]
    assert quotas.usage(OPEN) == {"concurrent_requests": 20, "tokens_last_minute": 20 * 10**9}
    for admission in held:
        admission.release()


def test_admission_is_atomic_under_concurrent_callers(make_quotas: MakeQuotas) -> None:
    quotas = make_quotas(Clock())
    admitted: list[object] = []
    refused: list[QuotaExceeded] = []

    def attempt() -> None:
        try:
            admitted.append(quotas.admit(LIMITED, 1))
        except QuotaExceeded as error:
            refused.append(error)

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 2 and len(refused) == 14


def test_redis_quotas_are_shared_and_a_dead_holder_frees_its_slot(
    clean_redis: redis.Redis,
) -> None:
    """Two API processes share one count; a slot whose process died comes back after its
    lease (the memory quotas have no other process to die)."""
    clock = Clock()
    one = RedisQuotas(clean_redis, "test", lease_s=30.0, clock=clock)
    two = RedisQuotas(clean_redis, "test", lease_s=30.0, clock=clock)
    one.admit(LIMITED, 40)  # never released: its process "dies"
    two.admit(LIMITED, 40)
    assert one.usage(LIMITED) == {"concurrent_requests": 2, "tokens_last_minute": 80}
    assert refusal(one, LIMITED, 1).quota == "concurrent_requests"
    assert refusal(two, OTHER, 101).quota == "tokens_per_minute"
    clock.now += 30.5
    assert two.usage(LIMITED)["concurrent_requests"] == 0
    assert refusal(two, LIMITED, 21).quota == "tokens_per_minute"  # the window still holds
    two.admit(LIMITED, 20).release()
