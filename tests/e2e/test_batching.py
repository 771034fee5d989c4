"""Batching across requests: concurrent requests from several clients are merged into shared
forwards, and every request still gets exactly its own result — the same as when it runs
alone, and the same as TransformerLens 3.9 with the equivalent Python hook functions.

The server gathers for up to 400 ms when a forward arrives alone, so the concurrent requests
below do share forwards (the test checks the scheduler's batch counters to be sure).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import hooklab
from fixtures.checkpoints import build_checkpoint
from hooklab_server.settings import Settings

from .e2e_helpers import assert_close
from .e2e_servers import Served, sample_tokens, served_checkpoint
from .test_tl_parity import CASES

# Hook specs of every kind, batch-coupled ones included (mean over the batch, another prompt
# as patch source, a stored cache as source), on prompts of different lengths.
MIXED = [
    ("steer", 6),
    ("ablate_mean_batch_head", 9),
    ("ablate_resample", 5),
    ("patch_cache_pos", 8),  # its stored cache is of the default 8 positions
    ("patch_row", 11),
    ("clamp_both", 7),
    ("project_out_glob_pos", 13),
    ("steer_pos", 10),
    ("several_specs", 12),
]
CAPTURED = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def gathering_server(gpt2_checkpoint: Path) -> Iterator[Served]:
    with served_checkpoint(gpt2_checkpoint, Settings(gather_window_ms=400.0)) as served:
        yield served


def _batched_requests(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return float(
        next(line.split()[1] for line in lines if line.startswith("hooklab_batch_requests_sum"))
    )


def _concurrently(jobs: list[Any]) -> list[Any]:
    """Run the callables at once (a barrier releases them together); their results."""
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = jobs[index]()
        except Exception as exc:  # reported below, with the others
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_requests_with_different_specs_get_their_solo_results(
    gathering_server: Served,
) -> None:
    served = gathering_server
    clients = [hooklab.connect(served.url) for _ in range(len(MIXED) + 1)]
    try:
        plans = []
        for (case, length), client in zip(MIXED, clients, strict=False):
            tokens = sample_tokens(served.tl, batch=2, pos=length, seed=length)
            ours, reference = CASES[case](served, tokens)
            plans.append((case, client, tokens, ours, reference))
        cache_tokens = sample_tokens(served.tl, batch=1, pos=5, seed=99)
        cache_client = clients[-1]

        def forward(plan: tuple[Any, ...]) -> Any:
            _, client, tokens, ours, _ = plan
            return lambda: client.run_with_hooks(tokens, fwd_hooks=ours)

        jobs = [forward(plan) for plan in plans]
        jobs.append(lambda: cache_client.run_with_cache(cache_tokens, names_filter=CAPTURED))
        before = _batched_requests(served.url)
        together = _concurrently(jobs)
        merged = _batched_requests(served.url) - before
        assert merged >= len(jobs) // 2, f"only {merged} requests ran in merged forwards"

        for (case, client, tokens, ours, reference), result in zip(plans, together, strict=False):
            assert not isinstance(result, Exception), f"{case}: {result!r}"
            alone = client.run_with_hooks(tokens, fwd_hooks=ours)
            assert_close(result, alone, f"{case} batched vs alone", atol=1e-5)
            expected = served.tl.run_with_hooks(tokens, fwd_hooks=reference)
            assert_close(result, expected, f"{case} batched vs TransformerLens")

        logits, cache = together[-1]
        tl_logits, tl_cache = served.tl.run_with_cache(cache_tokens, names_filter=CAPTURED)
        assert_close(logits, tl_logits, "run_with_cache logits batched vs TransformerLens")
        for name in CAPTURED:
            assert_close(cache[name], tl_cache[name], f"{name} batched vs TransformerLens")
    finally:
        for client in clients:
            client.close()


def test_one_requests_specs_never_reach_another_requests_rows(gathering_server: Served) -> None:
    """Toggling A's specs (a huge steer) in a shared forward leaves B's result unchanged."""
    served = gathering_server
    tokens_a = sample_tokens(served.tl, batch=1, pos=7, seed=1)
    tokens_b = sample_tokens(served.tl, batch=2, pos=9, seed=2)
    # A random direction: a constant one would vanish in the LayerNorm's centring.
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 50.0
    steer = [("blocks.0.hook_resid_post", hooklab.hooks.steer(vector, 1.0))]
    ablate = [("blocks.0.hook_mlp_out", hooklab.hooks.ablate("mean"))]
    a, b = hooklab.connect(served.url), hooklab.connect(served.url)
    try:
        plain = _concurrently(
            [
                lambda: a.run_with_hooks(tokens_a),
                lambda: b.run_with_hooks(tokens_b, fwd_hooks=ablate),
            ]
        )
        steered = _concurrently(
            [
                lambda: a.run_with_hooks(tokens_a, fwd_hooks=steer),
                lambda: b.run_with_hooks(tokens_b, fwd_hooks=ablate),
            ]
        )
    finally:
        a.close()
        b.close()
    assert (steered[0] - plain[0]).abs().max() > 1.0, "A's steer did nothing"
    assert_close(steered[1], plain[1], "B's logits beside A's steer", atol=1e-6)


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[Served]:
    """Qwen3: its per-head q/k norms' hook points flatten batch, position and head into rows."""
    folder = tmp_path_factory.mktemp("ckpt-f0-batching")  # a neutral name for TL
    checkpoint = build_checkpoint("qwen3", folder, tokenizer_dir=tokenizer_dir)
    with served_checkpoint(checkpoint, Settings(gather_window_ms=400.0)) as served:
        yield served


def test_requests_on_flattened_head_rows_run_alone_and_get_their_own_rows(
    qwen3_server: Served,
) -> None:
    """A capture or a hook on a point whose rows flatten batch, position and head cannot take a
    box of a merged forward: such requests run alone, and each gets exactly its solo result."""
    served, name = qwen3_server, "blocks.0.attn.q_norm.hook_normalized"
    prompts = [
        sample_tokens(served.tl, batch=b, pos=p, seed=s) for b, p, s in ((1, 7, 1), (2, 9, 2))
    ]
    clients = [hooklab.connect(served.url) for _ in prompts]

    def at_once(names: list[str]) -> list[Any]:
        return _concurrently(
            [
                lambda c=client, t=tokens: c.run_with_cache(t, names_filter=names)
                for client, tokens in zip(clients, prompts, strict=True)
            ]
        )

    try:
        before = _batched_requests(served.url)
        at_once(["blocks.0.hook_resid_post"])  # the control: these do share a forward
        merged = _batched_requests(served.url) - before
        results = at_once([name])
        merged_flattened = _batched_requests(served.url) - before - merged
    finally:
        for client in clients:
            client.close()
    assert merged == len(prompts) and merged_flattened == 0, (merged, merged_flattened)
    for (logits, cache), tokens in zip(results, prompts, strict=True):
        ref_logits, ref_cache = served.tl.run_with_cache(tokens, names_filter=[name])
        assert_close(logits, ref_logits, "logits")
        assert_close(cache[name], ref_cache[name], name)
