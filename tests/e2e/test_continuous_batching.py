"""Continuous batching: generations started at different times share the decode pool, each
still equal to its solo greedy output token for token (and to TransformerLens 3.9), a cancelled
one leaves its rows, and the others are unaffected."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import hooklab
from hooklab import hooks
from hooklab_server.settings import Settings

from .e2e_servers import Served, served_checkpoint

GREEDY: dict[str, Any] = {"do_sample": False, "stop_at_eos": False, "verbose": False}


@pytest.fixture(scope="module")
def pooled_server(gpt2_checkpoint: Path) -> Iterator[Served]:
    """A pool of 4 rows: with 6 generations, some wait for rows to free up."""
    settings = Settings(decode_rows=4, decode_positions=64)
    with served_checkpoint(gpt2_checkpoint, settings) as served:
        yield served


def _metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith(name + " ")))


def _plans(served: Served) -> list[tuple[torch.Tensor, int, list[Any], list[Any]]]:
    """(prompt ids, new tokens, our hook specs, TransformerLens hook functions) x 6."""
    d_model = served.tl.cfg.d_model
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(3))

    def steer(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x + 3.0 * vector

    def zero_head(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[:, :, 1] = 0.0
        return x

    steered = ("blocks.0.hook_resid_post", hooks.steer(vector, 3.0))
    ablated = ("blocks.1.attn.hook_z", hooks.ablate(head=[1]))
    shapes = [(1, 5), (1, 9), (2, 4), (1, 12), (1, 3), (1, 7)]  # (prompts, tokens)
    prompts = [
        torch.randint(3, 1000, shape, generator=torch.Generator().manual_seed(i))
        for i, shape in enumerate(shapes)
    ]
    return [
        (prompts[0], 40, [steered], [("blocks.0.hook_resid_post", steer)]),
        (prompts[1], 30, [], []),
        (prompts[2], 45, [ablated], [("blocks.1.attn.hook_z", zero_head)]),
        (prompts[3], 35, [steered], [("blocks.0.hook_resid_post", steer)]),
        (prompts[4], 50, [ablated], [("blocks.1.attn.hook_z", zero_head)]),
        (prompts[5], 38, [], []),
    ]


def test_staggered_generations_equal_their_solo_greedy_output(pooled_server: Served) -> None:
    served = pooled_server
    plans = _plans(served)
    solo = [
        served.model.generate(ids, max_new_tokens=new, fwd_hooks=ours, **GREEDY)
        for ids, new, ours, _ in plans
    ]
    steps_before = _metric(served.url, "hooklab_decode_rows_count")
    rows_before = _metric(served.url, "hooklab_decode_rows_sum")
    results: list[Any] = [None] * len(plans)

    def run(index: int) -> None:
        time.sleep(0.01 * index)  # staggered: each joins a pool that is already decoding
        client = hooklab.connect(served.url)
        try:
            ids, new, ours, _ = plans[index]
            results[index] = client.generate(ids, max_new_tokens=new, fwd_hooks=ours, **GREEDY)
        except Exception as exc:
            results[index] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, (result, alone) in enumerate(zip(results, solo, strict=True)):
        assert not isinstance(result, Exception), f"generation {index}: {result!r}"
        assert torch.equal(result, alone), f"generation {index} differs from its solo run"
    steps = _metric(served.url, "hooklab_decode_rows_count") - steps_before
    rows = _metric(served.url, "hooklab_decode_rows_sum") - rows_before
    assert rows / steps > 1.5, f"the pool decoded {rows / steps:.2f} rows per step on average"

    for (ids, new, _, theirs), ours in zip(plans[:3], results[:3], strict=True):
        with served.tl.hooks(fwd_hooks=theirs):
            expected = served.tl.generate(ids, max_new_tokens=new, **GREEDY)
        assert torch.equal(ours, expected), "a pooled generation differs from TransformerLens"


def test_a_cancelled_generation_frees_its_rows_and_others_are_unaffected(
    pooled_server: Served,
) -> None:
    served = pooled_server
    ids, new, ours, _ = _plans(served)[0]
    alone = served.model.generate(ids, max_new_tokens=new, fwd_hooks=ours, **GREEDY)
    cancelled = _metric(served.url, "hooklab_generations_cancelled_total")
    other = hooklab.connect(served.url)
    result: list[Any] = []
    try:
        stream = other.generate_stream(
            torch.tensor([[5, 6, 7]]), max_new_tokens=50, do_sample=False, stop_at_eos=False
        )
        next(stream)  # it is decoding in the pool now
        worker = threading.Thread(
            target=lambda: result.append(
                served.model.generate(ids, max_new_tokens=new, fwd_hooks=ours, **GREEDY)
            )
        )
        worker.start()
        for _ in range(3):
            next(stream)
        stream.close()  # leaves the pool between two steps
        worker.join(timeout=60)
    finally:
        other.close()
    deadline = time.monotonic() + 10
    while _metric(served.url, "hooklab_generations_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the cancelled generation was never counted"
        time.sleep(0.05)
    assert result and torch.equal(result[0], alone)
    # Its rows are free: a full pool's worth of generations runs at once afterwards.
    running = _metric(served.url, "hooklab_running_jobs")
    assert running == 0, f"{running} jobs still running after the cancel"


def test_seeded_sampling_is_reproducible_beside_other_generations(pooled_server: Served) -> None:
    """A seeded, sampled generation gives the same tokens alone and while it shares the pool
    with others (its random stream is its own)."""
    served = pooled_server
    ids = torch.tensor([[11, 12, 13, 14]])
    sampled = {"do_sample": True, "temperature": 0.9, "top_k": 50, "seed": 1234}
    alone = served.model.generate(ids, max_new_tokens=30, stop_at_eos=False, **sampled)
    plans = _plans(served)
    results: list[Any] = [None] * 3

    def run(index: int) -> None:
        client = hooklab.connect(served.url)
        try:
            if index == 0:
                results[0] = client.generate(ids, max_new_tokens=30, stop_at_eos=False, **sampled)
            else:
                prompt, new, ours, _ = plans[index]
                results[index] = client.generate(
                    prompt, max_new_tokens=new, fwd_hooks=ours, **GREEDY
                )
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert torch.equal(results[0], alone)
