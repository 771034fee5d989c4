"""The sparse top-k cache form of SAE feature activations (issue 17), in both deployments:
``run_with_cache(sparse_top_k=k)`` answers each position's k largest features as indices and
values, equal to torch.topk of the dense form from the same server and of SAELens's own
``SAE.encode``, streamed or as JSON, in far fewer bytes; a bad k is refused before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fixtures import saes
from hooklab.sparse import TopK
from hooklab_proto import TOP_K_INDICES_SUFFIX, TOP_K_VALUES_SUFFIX, tensor_from_json
from hooklab_server.settings import Settings

from .e2e_servers import Served, sample_tokens

HOOK = "blocks.1.hook_resid_pre"
MLP_HOOK = "blocks.0.mlp.hook_post"
ACTS = f"{HOOK}.hook_sae_acts_post"
PRE = f"{HOOK}.hook_sae_acts_pre"
D_SAE = 1024  # wide enough that the dense form is the expensive one, as real SAEs are


def write_sae(folder: Path, d_in: int, d_sae: int, seed: int) -> Path:
    """A JumpReLU SAE whose thresholds leave most features at 0, as a trained SAE does."""
    return saes.write_sae(
        folder, d_in, HOOK, "jumprelu", d_sae=d_sae, seed=seed, threshold=(0.5, 1.0)
    )


class TopKServed:
    def __init__(self, served: Served, folder: Path) -> None:
        self.served, self.folder = served, folder


@pytest.fixture(scope="module")
def top_k_server(
    serve_in, gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopKServed]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("top-k-saes")
    folder = write_sae(root / "resid", 64, D_SAE, 5)
    mlp = write_sae(root / "mlp", 256, 96, 6)
    settings = Settings(sae=(f"{folder}@{HOOK}", f"{mlp}@{MLP_HOOK}"))
    with serve_in(gpt2_checkpoint, settings) as served:
        yield TopKServed(served, folder)


def assert_top_k_of(sparse: TopK, dense: torch.Tensor, k: int) -> None:
    """``sparse`` is torch.topk(dense, k): the same values, in its order, at indices holding
    them (where values tie, either index of the tie holds the same value)."""
    values, indices = torch.topk(dense, k, dim=-1)
    assert sparse.values.shape == values.shape and sparse.indices.dtype == torch.int64
    torch.testing.assert_close(sparse.values, values, rtol=0, atol=0)
    assert torch.equal(dense.gather(-1, sparse.indices), sparse.values)
    assert torch.equal(sparse.indices, indices) or bool((values == 0).any())  # ties at 0


def test_top_k_equals_the_dense_forms_top_k_and_saelens(top_k_server: TopKServed) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    served = top_k_server.served
    model, k = served.model, 16
    tokens = sample_tokens(served.tl, batch=2, pos=7, seed=11)
    names = [HOOK, PRE, ACTS, "blocks.0.hook_resid_post"]
    logits, dense = model.run_with_cache(tokens, names_filter=names, lazy=False)
    sparse_logits, cache = model.run_with_cache(tokens, names_filter=names, sparse_top_k=k)
    assert torch.equal(sparse_logits, logits)
    for name in (PRE, ACTS):
        entry = cache[name]
        assert isinstance(entry, TopK) and entry.shape == dense[name].shape
        assert_top_k_of(entry, dense[name], k)
    # The other points stay dense; a reconstruction from the sparse form is the dense form
    # wherever k covers every active feature.
    assert torch.equal(cache[HOOK], dense[HOOK])
    active = int((dense[ACTS] > 0).sum(-1).max())
    assert k < active < D_SAE // 4  # sparse, as a trained SAE's features are
    _, every = model.run_with_cache(tokens, names_filter=[ACTS], sparse_top_k=active)
    assert torch.equal(every[ACTS].to_dense(), dense[ACTS])
    assert torch.equal(every[ACTS].to_sparse().to_dense(), dense[ACTS])
    # SAELens's own encode of the same input gives the same top k.
    sae = sae_lens.SAE.load_from_disk(str(top_k_server.folder), device="cpu").eval()
    with torch.no_grad():
        theirs = sae.encode(dense[HOOK])
    values, _ = torch.topk(theirs, k, dim=-1)
    torch.testing.assert_close(cache[ACTS].values, values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        theirs.gather(-1, cache[ACTS].indices), cache[ACTS].values, rtol=1e-4, atol=1e-5
    )


def test_named_points_and_remove_batch_dim(top_k_server: TopKServed) -> None:
    """Any cached point may take the form (here the residual and the attention pattern, whose
    last axis is the key position); without the batch axis it is [pos, k]."""
    served = top_k_server.served
    model = served.model
    tokens = sample_tokens(served.tl, batch=1, pos=6, seed=12)
    names = [HOOK, "blocks.0.attn.hook_pattern", ACTS]
    _, dense = model.run_with_cache(tokens, names_filter=names, remove_batch_dim=True)
    spec = {"k": 3, "names": [HOOK, "blocks.*.attn.hook_pattern"]}
    _, cache = model.run_with_cache(
        tokens, names_filter=names, remove_batch_dim=True, sparse_top_k=spec
    )
    assert_top_k_of(cache[HOOK], dense[HOOK], 3)
    assert cache[HOOK].values.shape == (6, 3)
    assert_top_k_of(cache["blocks.0.attn.hook_pattern"], dense["blocks.0.attn.hook_pattern"], 3)
    assert torch.equal(cache[ACTS], dense[ACTS])  # not named: dense


def test_top_k_moves_far_fewer_bytes(top_k_server: TopKServed) -> None:
    served = top_k_server.served
    model, transport = served.model, served.model._transport
    tokens = sample_tokens(served.tl, batch=4, pos=16, seed=13)
    names = [PRE, ACTS]
    options = {"names_filter": names, "return_type": None, "lazy": False}
    before = transport.received_bytes
    model.run_with_cache(tokens, **options)
    dense = transport.received_bytes - before
    before = transport.received_bytes
    model.run_with_cache(tokens, sparse_top_k=8, **options)
    sparse = transport.received_bytes - before
    assert dense >= 2 * 4 * 16 * D_SAE * 4  # two float32 [4, 16, 1024]
    payload = 2 * 4 * 16 * 8 * (4 + 4)  # per point: I32 indices and F32 values [4, 16, 8]
    assert payload <= sparse < payload + 4096, (sparse, payload)
    assert sparse * 32 < dense, (sparse, dense)


def test_json_answers_the_same_top_k(top_k_server: TopKServed) -> None:
    served = top_k_server.served
    tokens = sample_tokens(served.tl, batch=2, pos=5, seed=14)
    _, cache = served.model.run_with_cache(tokens, names_filter=[ACTS], sparse_top_k=4)
    body = {"input": tokens.tolist(), "names": [ACTS], "return_type": None}
    answer = httpx.post(
        f"{served.url}/v1/run_with_cache", json={**body, "sparse_top_k": {"k": 4}},
        headers={"accept": "application/json"}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    tensors = answer.json()["tensors"]
    assert set(tensors) == {ACTS + TOP_K_INDICES_SUFFIX, ACTS + TOP_K_VALUES_SUFFIX}
    indices = tensor_from_json(tensors[ACTS + TOP_K_INDICES_SUFFIX])
    assert indices.dtype == torch.int32 and list(indices.shape) == [2, 5, 4]
    assert torch.equal(indices.long(), cache[ACTS].indices)
    assert torch.equal(tensor_from_json(tensors[ACTS + TOP_K_VALUES_SUFFIX]), cache[ACTS].values)


@pytest.mark.parametrize(
    ("sparse_top_k", "names", "message"),
    [
        ({"k": D_SAE + 1}, [ACTS], "more than the last axis"),
        ({"k": 0}, [ACTS], "sparse_top_k.k"),
        ({"k": 2}, [HOOK], "no SAE feature activations"),
        ({"k": 2, "names": [ACTS]}, [HOOK], "not among the names cached"),
        ({"k": 65, "names": [HOOK]}, [HOOK], "d_model: 64"),
        ({"k": 2, "lazy": True}, [ACTS], None),
    ],
)
def test_a_bad_k_is_refused_before_any_work(
    top_k_server: TopKServed, sparse_top_k: dict[str, object], names: list[str], message: str
) -> None:
    served = top_k_server.served
    body: dict[str, object] = {"input": "Hello there", "names": names}
    sparse_top_k = dict(sparse_top_k)  # the parameters are shared by both deployments
    if sparse_top_k.pop("lazy", False):
        body["lazy"] = True
        message = "no lazy"
    answer = httpx.post(
        f"{served.url}/v1/run_with_cache", json={**body, "sparse_top_k": sparse_top_k}, timeout=60
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "validation_error" and message in error["message"], error


def test_a_stored_or_lazy_cache_is_read_in_the_top_k_form(top_k_server: TopKServed) -> None:
    """A cache kept on the server holds the dense activations; GET /v1/caches/{id}?top_k=k
    reads its entries in the sparse form (frames or JSON), for far fewer bytes."""
    served = top_k_server.served
    model, transport = served.model, served.model._transport
    tokens = sample_tokens(served.tl, batch=2, pos=9, seed=15)
    _, lazy = model.run_with_cache(tokens, names_filter=[HOOK, ACTS], lazy=True)
    dense = lazy[ACTS]
    path = f"/v1/caches/{lazy.cache_id}"
    before = transport.received_bytes
    _, tensors = transport.frames("GET", path, query={"names": [ACTS], "top_k": "8"})
    moved = transport.received_bytes - before
    values, _ = torch.topk(dense, 8, dim=-1)
    assert torch.equal(tensors[ACTS + TOP_K_VALUES_SUFFIX], values)
    assert tensors[ACTS + TOP_K_INDICES_SUFFIX].dtype == torch.int32
    assert torch.equal(dense.gather(-1, tensors[ACTS + TOP_K_INDICES_SUFFIX].long()), values)
    assert moved * 32 < dense.numel() * 4, moved
    # The client's cache.top_k: the same read for a lazy cache, taken here for an eager one.
    _, fresh = model.run_with_cache(tokens, names_filter=[HOOK, ACTS], lazy=True)
    before = transport.received_bytes
    read = fresh.top_k(ACTS, 8)
    assert transport.received_bytes - before == moved
    assert torch.equal(read.values, values) and read.width == D_SAE
    _, eager = model.run_with_cache(tokens, names_filter=[ACTS], lazy=False)
    assert torch.equal(eager.top_k(ACTS, 8).values, values)
    _, rows = model.run_with_cache(tokens, names_filter=[ACTS], lazy=True)
    assert torch.equal(rows.apply_slice_to_batch_dim(1).top_k(ACTS, 8).values, values[1])
    answer = httpx.get(
        f"{served.url}{path}", params={"names": [ACTS], "top_k": "8"},
        headers={"accept": "application/json"}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    as_json = answer.json()["tensors"]
    assert torch.equal(tensor_from_json(as_json[ACTS + TOP_K_VALUES_SUFFIX]), values)
    for bad, message in (("0", "positive integer"), ("x", "positive integer"), ("65", "64")):
        refused = httpx.get(
            f"{served.url}{path}", params={"names": [HOOK], "top_k": bad}, timeout=60
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "validation_error" and message in error["message"], error


def test_wire_dtype_rounds_after_the_selection_and_gradients_stay_dense(
    top_k_server: TopKServed,
) -> None:
    served = top_k_server.served
    model = served.model
    tokens = sample_tokens(served.tl, batch=1, pos=6, seed=16)
    _, dense = model.run_with_cache(tokens, names_filter=[ACTS], lazy=False)
    expected = torch.topk(dense[ACTS], 8, dim=-1).values
    model.wire_dtype = "float16"
    try:
        _, half = model.run_with_cache(tokens, names_filter=[ACTS], sparse_top_k=8)
    finally:
        model.wire_dtype = None
    assert torch.equal(half[ACTS].values, expected.half().float())
    assert torch.equal(dense[ACTS].gather(-1, half[ACTS].indices), expected)
    # The host point in the sparse form too: its gradient (and every other) stays dense.
    spec = {"k": 8, "names": [HOOK, ACTS]}
    _, grads = model.run_with_cache(
        tokens, names_filter=[HOOK, ACTS], sparse_top_k=spec, incl_bwd=True, return_type="loss"
    )
    assert isinstance(grads[ACTS], TopK) and torch.equal(grads[ACTS].values, expected)
    assert isinstance(grads[HOOK], TopK)
    assert grads[HOOK + "_grad"].shape == (1, 6, 64)
