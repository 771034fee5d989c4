"""The fair queue's order, exactly: deficit round robin across keys by cost, bounded queues,
admission by memory. Pure policy, so the order is asserted, not timed."""

from __future__ import annotations

import pytest

from hooklab_server.scheduler import FairQueue, Job, QueueFull


def make_queue(**overrides: int) -> FairQueue:
    options = {"quantum": 100, "max_per_key": 100, "max_total": 1000, "memory_budget": 10_000}
    return FairQueue(**{**options, **overrides})


def job(key: str, cost: float = 10, reserve: int = 0, units: int = 1) -> Job:
    return Job(key, cost, reserve, submitted=0.0, payload={"units": units})


def serve(queue: FairQueue, limit: int = 1000) -> list[str]:
    """Run units until nothing runs; the keys in the order their units ran."""
    order = []
    for _ in range(limit):
        picked = queue.next()
        if picked is None:
            return order
        picked.started = picked.started or 1.0
        order.append(picked.key)
        left = picked.payload["units"] - 1
        picked.payload["units"] = left
        queue.ran(picked, picked.cost, 0.01, picked.cost if left else None)
    raise AssertionError("the queue never emptied")


def test_one_key_with_fifty_requests_does_not_starve_another_keys_one() -> None:
    queue = make_queue()
    for _ in range(50):
        queue.submit(job("heavy", cost=90))
    queue.submit(job("light", cost=5))
    order = serve(queue)
    assert order.index("light") <= 1, order  # served within one unit of arriving
    assert order.count("heavy") == 50


def test_a_key_arriving_later_is_served_within_the_current_visit() -> None:
    """The running key's visit ends at most one unit after the newcomer arrives."""
    queue = make_queue()
    for _ in range(20):
        queue.submit(job("heavy", cost=50, units=3))
    first = queue.next()
    assert first is not None and first.key == "heavy"
    first.started = 1.0
    queue.ran(first, first.cost, 0.01, first.cost)
    queue.submit(job("light"))
    assert serve(queue).index("light") <= 1


def test_multi_unit_jobs_alternate_unit_by_unit() -> None:
    """A sweep of 5 chunks and a sweep of 5 chunks of another key interleave."""
    queue = make_queue()
    queue.submit(job("a", cost=100, units=5))
    queue.submit(job("b", cost=100, units=5))
    assert serve(queue) == ["a", "b"] * 5


def test_cost_weights_the_share() -> None:
    """Units costing a quarter of another key's run about four times as often."""
    queue = make_queue(quantum=100)
    queue.submit(job("big", cost=100, units=10))
    queue.submit(job("small", cost=25, units=40))
    order = serve(queue)
    first_half = order[: len(order) // 2]
    assert 3 <= first_half.count("small") / max(1, first_half.count("big")) <= 5, order


def test_bounded_queues_refuse_with_retry_after() -> None:
    queue = make_queue(max_per_key=3, max_total=5)
    for _ in range(3):
        queue.submit(job("a"))
    with pytest.raises(QueueFull) as per_key:
        queue.submit(job("a"))
    assert "max_queued_per_key" in per_key.value.message and per_key.value.retry_after >= 1
    queue.submit(job("b"))
    queue.submit(job("c"))
    with pytest.raises(QueueFull) as overall:
        queue.submit(job("d"))
    assert "max_queued" in overall.value.message


def test_work_waits_for_memory_and_others_run_meanwhile() -> None:
    queue = make_queue(memory_budget=1000)
    holder = job("a", reserve=800, units=3)
    queue.submit(holder)
    picked = queue.next()
    assert picked is holder and queue.reserved == 800
    picked.started = 1.0
    queue.ran(picked, picked.cost, 0.01, picked.cost)
    queue.submit(job("big", reserve=500))
    queue.submit(job("small", reserve=100))
    order = serve(queue)
    # "big" fits only once "a" released its 800 bytes; "small" ran before that.
    assert order.index("small") < order.index("big")
    assert order.index("big") > max(i for i, key in enumerate(order) if key == "a")
    assert queue.reserved == 0


def test_removing_a_queued_job_releases_it() -> None:
    queue = make_queue()
    gone = job("a", reserve=100)
    queue.submit(gone)
    queue.submit(job("b"))
    queue.remove(gone)
    assert serve(queue) == ["b"]
    assert queue.depth() == 0 and queue.reserved == 0


def test_small_units_of_a_sweep_do_not_delay_a_light_request_by_more_than_one() -> None:
    """A sweep of many small chunks and a light request: the light one runs after at most one
    more chunk, whatever the configured quantum."""
    queue = make_queue(quantum=10_000)
    queue.submit(job("sweep", cost=10, units=100))
    first = queue.next()
    assert first is not None
    first.started = 1.0
    queue.ran(first, first.cost, 0.01, first.cost)
    queue.submit(job("light", cost=5))
    assert serve(queue).index("light") <= 1


def test_units_waited_counts_other_work_run_before_the_first_unit() -> None:
    queue = make_queue()
    queue.submit(job("a", cost=100, units=4))  # a whole quantum per unit: one unit per visit
    first = queue.next()
    assert first is not None
    first.started = 1.0
    queue.ran(first, first.cost, 0.01, first.cost)
    late = job("b")
    queue.submit(late)
    serve(queue)
    assert late.units_waited == 0  # served next: no unit ran between its arrival and its turn
