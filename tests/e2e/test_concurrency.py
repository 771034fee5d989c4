"""Concurrent requests against one server: each result equals TransformerLens's result for that
request's own hooks and names — hooks and caches never leak between requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import hooklab
from hooklab import hooks

from .e2e_helpers import assert_close, edit
from .e2e_servers import Served, sample_tokens

N_REQUESTS = 16


def _jobs(served: Served, tokens: torch.Tensor) -> list[tuple[str, Callable[[Any], Any], Any]]:
    """(label, remote call given a client, expected value computed with TL) for each request."""
    tl = served.tl
    direction = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(0))
    jobs: list[tuple[str, Callable[[Any], Any], Any]] = []

    # steering with a different coefficient each
    for coeff in (-4.0, -1.0, 0.5, 2.0, 6.0):
        name = "blocks.1.hook_resid_pre"
        ref = edit(lambda x, c=coeff: x + c * direction, "bpd", {})
        jobs.append(
            (
                f"steer {coeff}",
                lambda m, c=coeff, n=name: m.run_with_hooks(
                    tokens, fwd_hooks=[(n, hooks.steer(direction, c))]
                ),
                tl.run_with_hooks(tokens, fwd_hooks=[(name, ref)]),
            )
        )
    # ablating a different head / layer each
    for layer, head in ((0, 0), (0, 3), (1, 1), (1, 2)):
        name = f"blocks.{layer}.attn.hook_z"
        ref = edit(torch.zeros_like, "bphd", {"head": [head]})
        jobs.append(
            (
                f"ablate L{layer}H{head}",
                lambda m, n=name, h=head: m.run_with_hooks(
                    tokens, fwd_hooks=[(n, hooks.ablate(head=h))]
                ),
                tl.run_with_hooks(tokens, fwd_hooks=[(name, ref)]),
            )
        )
    # caching different names (some under a hook)
    for names in (
        ["blocks.0.hook_resid_post"],
        ["blocks.1.attn.hook_pattern", "hook_embed"],
        ["blocks.0.mlp.hook_post", "ln_final.hook_normalized"],
    ):
        _, ref_cache = tl.run_with_cache(tokens, names_filter=names, return_cache_object=False)
        jobs.append(
            (
                f"cache {names}",
                lambda m, ns=names: m.run_with_cache(
                    tokens, names_filter=ns, return_cache_object=False
                )[1],
                ref_cache,
            )
        )
    name = "blocks.0.hook_resid_post"
    with tl.hooks(fwd_hooks=[(name, edit(lambda x: x * 0.25, "bpd", {"pos": [1, 2]}))]):
        _, ref_cache = tl.run_with_cache(tokens, names_filter=[name, "blocks.1.hook_resid_post"])
    jobs.append(
        (
            "cache under scale",
            lambda m: m.run_with_cache(
                tokens,
                names_filter=[name, "blocks.1.hook_resid_post"],
                return_cache_object=False,
                fwd_hooks=[(name, hooks.scale(0.25, pos=[1, 2]))],
            )[1],
            dict(ref_cache.items()),
        )
    )
    # plain forwards and losses, which must see no hook at all
    jobs.append(("plain", lambda m: m(tokens), tl(tokens)))
    jobs.append(("loss", lambda m: m(tokens, return_type="loss"), tl(tokens, return_type="loss")))
    jobs.append(
        (
            "ablate resid L0 + loss",
            lambda m: m.run_with_hooks(
                tokens, return_type="loss", fwd_hooks=[("blocks.0.hook_resid_post", hooks.ablate())]
            ),
            tl.run_with_hooks(
                tokens,
                return_type="loss",
                fwd_hooks=[("blocks.0.hook_resid_post", edit(torch.zeros_like, "bpd", {}))],
            ),
        )
    )
    return jobs


def _check(label: str, actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{label}: keys {set(actual)} != {set(expected)}"
        for key, value in expected.items():
            assert_close(actual[key], value, f"{label}: {key}")
    else:
        assert_close(actual, expected, label)


@pytest.mark.parametrize("shared_client", [True, False], ids=["shared_client", "client_per_thread"])
def test_concurrent_requests_do_not_leak_hooks(server: Served, shared_client: bool) -> None:
    tokens = sample_tokens(server.tl, batch=2, pos=12)
    jobs = _jobs(server, tokens)
    assert len(jobs) >= N_REQUESTS
    barrier = threading.Barrier(len(jobs))

    def work(job: tuple[str, Callable[[Any], Any], Any]) -> tuple[str, Any, Any]:
        label, call, expected = job
        client = server.model if shared_client else hooklab.connect(server.url)
        try:
            barrier.wait(timeout=60)
            results = [call(client) for _ in range(2)]  # twice: more interleavings
        finally:
            if not shared_client:
                client.close()
        return label, results, expected

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(work, jobs))
    for label, results, expected in outcomes:
        for actual in results:
            _check(label, actual, expected)


def test_concurrent_store_and_use(gpt2_server: Served) -> None:
    """Threads each store their own steering vector and steer with it by id."""
    tl = gpt2_server.tl
    tokens = sample_tokens(tl, batch=1, pos=10)
    vectors = [
        torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    name = "blocks.0.hook_resid_pre"
    expected = [
        tl.run_with_hooks(tokens, fwd_hooks=[(name, edit(lambda x, v=v: x + v, "bpd", {}))])
        for v in vectors
    ]
    barrier = threading.Barrier(len(vectors))

    def work(index: int) -> torch.Tensor:
        model = gpt2_server.model
        barrier.wait(timeout=60)
        object_id = model.store_tensor(vectors[index])
        try:
            return model.run_with_hooks(tokens, fwd_hooks=[(name, hooks.steer(object_id))])
        finally:
            model.delete_stored(object_id)

    with ThreadPoolExecutor(max_workers=len(vectors)) as pool:
        results = list(pool.map(work, range(len(vectors))))
    for index, (actual, ref) in enumerate(zip(results, expected, strict=True)):
        assert_close(actual, ref, f"vector {index}")
