"""A cache that stays on the server (``run_with_cache(..., lazy=True)``): its index arrives at
once, its activations when read — and every analysis method gives what the eager cache and
TransformerLens 3.9's own ``ActivationCache`` give on the same weights and tokens."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hooklab.remote_cache import CacheGoneError

from .e2e_servers import Served, sample_tokens

ATOL = 1e-4

# (method, kwargs): each analysis method with a few of its arguments.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("accumulated_resid", {}),
    ("accumulated_resid", {"apply_ln": True, "pos_slice": -1, "return_labels": True}),
    ("accumulated_resid", {"layer": 1, "incl_mid": True}),
    ("decompose_resid", {"return_labels": True}),
    ("decompose_resid", {"apply_ln": True, "pos_slice": -1}),
    ("stack_head_results", {"return_labels": True}),
    ("stack_head_results", {"layer": 1, "apply_ln": True, "pos_slice": -1, "incl_remainder": True}),
    ("stack_neuron_results", {"layer": 2, "return_labels": True}),
    ("stack_neuron_results", {"layer": 1, "apply_ln": True, "pos_slice": -1}),
    ("get_neuron_results", {"layer": 1, "neuron_slice": (2, 8)}),
    ("get_full_resid_decomposition", {"return_labels": True}),
    ("get_full_resid_decomposition", {"apply_ln": True, "pos_slice": -1, "expand_neurons": False}),
    ("stack_activation", {"activation_name": "pattern"}),
    ("stack_activation", {"activation_name": "scale", "sublayer_type": "ln1"}),
    ("logit_attrs", {"residual_stack": "<decomposition>", "tokens": 5, "incorrect_tokens": 11}),
    ("apply_ln_to_stack", {"residual_stack": "<decomposition>", "layer": 1}),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    return f"{case[0]}({','.join(f'{k}={v}' for k, v in case[1].items())})"


def _call(cache: Any, method: str, kwargs: dict[str, Any], stack: torch.Tensor) -> Any:
    resolved = {k: (stack if v == "<decomposition>" else v) for k, v in kwargs.items()}
    return getattr(cache, method)(**resolved)


def _assert_same(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), what
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e, what)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=what)
    else:
        assert actual == expected, what


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_analysis_method_lazy_equals_eager_equals_tl(
    server: Served, case: tuple[str, dict[str, Any]]
) -> None:
    from transformer_lens import ActivationCache as TLCache

    method, kwargs = case
    tokens = sample_tokens(server.tl, batch=2, pos=6, seed=50)
    _, lazy = server.model.run_with_cache(tokens, lazy=True)
    _, eager = server.model.run_with_cache(tokens, lazy=False)
    _, ref = server.tl.run_with_cache(tokens)
    assert lazy.lazy and not eager.lazy and isinstance(ref, TLCache)
    stack = ref.decompose_resid()
    try:
        expected = _call(ref, method, kwargs, stack)
    except KeyError:  # an activation this architecture lacks (NeoX: no resid_mid)
        for cache in (eager, lazy):
            with pytest.raises(KeyError):
                _call(cache, method, kwargs, stack)
        return
    _assert_same(_call(eager, method, kwargs, stack), expected, f"eager {method}")
    _assert_same(_call(lazy, method, kwargs, stack), expected, f"lazy {method}")


def test_the_index_travels_at_once_and_each_entry_when_read(gpt2_server: Served) -> None:
    model = gpt2_server.model
    transport = model._transport
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=8, seed=51)
    _, eager = model.run_with_cache(tokens, return_type=None, lazy=False)
    before = transport.received_bytes
    _, cache = model.run_with_cache(tokens, return_type=None, lazy=True)
    index_bytes = transport.received_bytes - before
    assert index_bytes < 2048, f"the index alone took {index_bytes} bytes"
    # No bytes for names, length, membership, shapes, iteration.
    assert list(cache.keys()) == list(eager.keys()) and len(cache) == len(eager)
    assert "blocks.1.hook_resid_post" in cache and "nope" not in cache
    assert [cache._shape(n) for n in cache] == [eager[n].shape for n in eager]
    assert transport.received_bytes - before == index_bytes
    # One entry: its bytes (and a frame header), once.
    name = "blocks.1.attn.hook_pattern"
    before = transport.received_bytes
    torch.testing.assert_close(cache[name], eager[name], atol=0, rtol=0)
    moved = transport.received_bytes - before
    nbytes = eager[name].numel() * eager[name].element_size()
    assert nbytes <= moved < nbytes + 1024, (moved, nbytes)
    cache[name]
    assert transport.received_bytes - before == moved, "read again: kept here"
    # An analysis method runs on the server: its result travels, not what it reads.
    before = transport.received_bytes
    stack = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    moved = transport.received_bytes - before
    nbytes = stack.numel() * stack.element_size()
    assert nbytes <= moved < nbytes + 1024, (moved, nbytes)
    assert cache.cache_dict.fetched_names() == [name], "no entry was brought here for it"
    # Set here (compute_head_results): the entries it reads come in one request, then it runs here.
    before = transport.received_bytes
    cache.compute_head_results()
    z = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    nbytes = sum(eager[n].numel() * eager[n].element_size() for n in z)
    moved = transport.received_bytes - before
    assert nbytes <= moved < nbytes + 2048, (moved, nbytes)


def test_batch_views_and_devices_apply_to_what_arrives(gpt2_server: Served) -> None:
    model = gpt2_server.model
    tokens = sample_tokens(gpt2_server.tl, batch=3, pos=5, seed=52)
    _, eager = model.run_with_cache(tokens, lazy=False)
    _, lazy = model.run_with_cache(tokens, lazy=True)
    name = "blocks.0.hook_mlp_out"
    rows = lazy.apply_slice_to_batch_dim([2, 0])
    torch.testing.assert_close(rows[name], eager[name][[2, 0]])
    one = lazy.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and one._shape(name) == eager[name][1].shape
    torch.testing.assert_close(one[name], eager[name][1])
    _, single = model.run_with_cache(tokens[:1], lazy=True, remove_batch_dim=True)
    _, single_eager = model.run_with_cache(tokens[:1], lazy=False, remove_batch_dim=True)
    torch.testing.assert_close(single[name], single_eager[name])
    assert single.to("cpu") is single and single[name].device.type == "cpu"


def test_release_expiry_and_collection_free_the_server_copy(
    gpt2_server: Served, make_server: Callable[..., Served]
) -> None:
    model = gpt2_server.model
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=53)

    def stored() -> set[str]:
        return {o["id"] for o in model._transport.get_json("/v1/caches")["objects"]}

    _, cache = model.run_with_cache(tokens, lazy=True)
    kept = cache["blocks.0.hook_resid_pre"]
    assert cache.cache_id in stored()
    cache.release()
    assert cache.cache_id not in stored()
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], kept)  # read before: still here
    with pytest.raises(CacheGoneError, match="released"):
        cache["blocks.1.hook_resid_pre"]

    logits, cache = model.run_with_cache(tokens, lazy=True)
    cache_id = cache.cache_id
    del logits, cache  # the logits stayed with the activations: they keep the copy too
    gc.collect()
    deadline = time.monotonic() + 10
    while cache_id in stored() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache_id not in stored(), "collecting the last cache reading it releases it"

    short = make_server(store_ttl_s=1.0)
    _, cache = short.model.run_with_cache(tokens, lazy=True)
    time.sleep(1.5)
    with pytest.raises(CacheGoneError, match=r"kept 1 s \(server setting store_ttl_s\)"):
        cache["blocks.0.hook_resid_pre"]


def test_a_lazy_cache_of_nothing_is_an_empty_cache(gpt2_server: Served) -> None:
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=59)
    logits, cache = gpt2_server.model.run_with_cache(tokens, names_filter=[], lazy=True)
    assert len(cache) == 0 and not cache.lazy
    torch.testing.assert_close(logits, gpt2_server.model(tokens))


def test_the_default_rule_is_a_size_threshold(gpt2_server: Served) -> None:
    model = gpt2_server.model
    tokens = sample_tokens(gpt2_server.tl, batch=1, pos=5, seed=54)
    assert not model.run_with_cache(tokens)[1].lazy  # a few kilobytes: eager
    before = model.lazy_cache_bytes
    model.lazy_cache_bytes = 4096
    try:
        _, cache = model.run_with_cache(tokens)
        assert cache.lazy
        _, small = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
        assert not small.lazy  # 5 x 64 floats (1,280 bytes): under the threshold
    finally:
        model.lazy_cache_bytes = before


def test_the_logits_of_a_lazy_cache_stay_there_until_used(gpt2_server: Served) -> None:
    model, transport = gpt2_server.model, gpt2_server.model._transport
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=8, seed=55)
    eager_logits, _ = model.run_with_cache(tokens, lazy=False)
    before = transport.received_bytes
    logits, cache = model.run_with_cache(tokens, lazy=True)
    assert transport.received_bytes - before < 4096  # the index: names, shapes, dtypes
    assert logits.shape == eager_logits.shape and logits.dtype == eager_logits.dtype
    assert "output.logits" not in cache, "an output, not an activation"
    torch.testing.assert_close(logits[:, -1].log_softmax(-1), eager_logits[:, -1].log_softmax(-1))
    loss, lazy_loss_cache = model.run_with_cache(tokens, lazy=True, return_type="loss")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and lazy_loss_cache.lazy


@pytest.mark.parametrize("wire_dtype, rounding", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_a_wire_dtype_halves_the_bytes_within_its_rounding(
    gpt2_server: Served, wire_dtype: str, rounding: float
) -> None:
    model, transport = gpt2_server.model, gpt2_server.model._transport
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=8, seed=56)
    exact_logits, exact = model.run_with_cache(tokens, lazy=False)
    before = transport.received_bytes
    model.run_with_cache(tokens, lazy=False)
    full = transport.received_bytes - before
    model.wire_dtype = wire_dtype
    try:
        before = transport.received_bytes
        logits, cache = model.run_with_cache(tokens, lazy=False)
        half = transport.received_bytes - before
        _, lazy = model.run_with_cache(tokens, lazy=True)
        before = transport.received_bytes
        entry = lazy["blocks.1.hook_mlp_out"]
        fetched = transport.received_bytes - before
    finally:
        model.wire_dtype = None
    assert half < 0.55 * full, (half, full)
    nbytes = exact["blocks.1.hook_mlp_out"].numel() * 2
    assert nbytes <= fetched < nbytes + 1024
    pairs = [(logits, exact_logits), *((cache[n], exact[n]) for n in exact)]
    pairs.append((entry, exact["blocks.1.hook_mlp_out"]))
    for got, want in pairs:  # float32 here again, within half a unit of the dtype's last place
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rounding, atol=1e-6)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"method": "accumulated_resid", "args": {"nope": 1}}, 422, "has no argument 'nope'"),
        ({"method": "__class__"}, 422, "method"),
        ({"method": "accumulated_resid", "cache": "c_nope"}, 404, "no stored cache"),
        ({"method": "stack_activation", "args": {"activation_name": "nope"}}, 422, "KeyError"),
        ({"method": "accumulated_resid", "rows": [0, 5]}, 422, "row 5 is outside"),
        ({"method": "accumulated_resid", "args": {"pos_slice": {"start": 1, "stop": 9}}}, 200, ""),
    ],
    ids=["unknown-argument", "not-a-method", "no-cache", "missing-entry", "row", "tuple-slice"],
)
def test_analysis_requests_are_checked_before_they_run(
    gpt2_server: Served, body: dict[str, Any], status: int, words: str
) -> None:
    from hooklab.errors import ServerError

    model = gpt2_server.model
    tokens = sample_tokens(gpt2_server.tl, batch=2, pos=5, seed=57)
    _, cache = model.run_with_cache(tokens, lazy=True)
    request = {"cache": cache.cache_id, **body}
    if status == 200:
        _, tensors = model._transport.frames("POST", "/v1/analysis", request)
        _, eager = model.run_with_cache(tokens, lazy=False)
        torch.testing.assert_close(
            tensors["analysis.result"], eager.accumulated_resid(pos_slice=(1, 9))
        )
        return
    with pytest.raises(ServerError, match=words) as caught:
        model._transport.frames("POST", "/v1/analysis", request)
    assert caught.value.status == status


def test_an_analysis_result_over_the_response_limit_is_refused_first(
    make_server: Callable[..., Served],
) -> None:
    from hooklab.errors import TooLargeError

    served = make_server(max_response_bytes=64 * 1024)
    tokens = sample_tokens(served.tl, batch=2, pos=8, seed=58)
    _, cache = served.model.run_with_cache(tokens, lazy=True)
    with pytest.raises(TooLargeError, match="max_response_bytes"):
        cache.get_full_resid_decomposition()  # ~530 components x 2 x 8 x 64 floats
    assert cache.accumulated_resid().shape[0] == served.model.cfg.n_layers + 1  # small: runs
