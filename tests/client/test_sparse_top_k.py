"""The client's sparse top-k entries (hooklab.sparse.TopK) without a server: the dense and COO
forms, torch.topk's unpacking, views on the leading axes as an ActivationCache takes them,
and how the wire's indices/values pairs are joined."""

from __future__ import annotations

import torch
from hooklab_analysis.utils import as_slice

from hooklab.sparse import TopK, gather_top_k, last_axis_sizes, top_k_of

HOOK = "blocks.1.hook_resid_pre"
ACTS = f"{HOOK}.hook_sae_acts_post"


def relu_acts(seed: int = 0) -> torch.Tensor:
    """[2, 5, 40] activations, most of them 0 (at most 12 per position fire)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 40, generator=gen)
    return torch.where(x > 1.2, x, torch.zeros(()))


def test_dense_and_coo_forms_give_back_the_activations() -> None:
    acts = relu_acts()
    active = int((acts > 0).sum(-1).max())
    top = top_k_of(acts, active)
    assert top.shape == acts.shape and top.k == active and top.width == 40
    assert torch.equal(top.to_dense(), acts)
    sparse = top.to_sparse()
    assert sparse.is_sparse and torch.equal(sparse.to_dense(), acts)
    values, indices = top  # as torch.topk's result unpacks
    expected = torch.topk(acts, active, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_views_on_leading_axes_and_a_shorter_k() -> None:
    acts = relu_acts(1)
    top = top_k_of(acts, 6)
    for index in (1, (0, 2), [1, 0]):
        view = as_slice(index).apply(top, dim=0)
        assert isinstance(view, TopK)
        assert torch.equal(view.values, as_slice(index).apply(top.values, dim=0))
    assert torch.equal(top[0, 3].values, top.values[0, 3])
    assert top.size(0) == 2 and top.size() == acts.shape and top.ndim == 3
    moved = top.to(torch.float64)
    assert moved.dtype == torch.float64 and moved.indices.dtype == torch.int64
    assert torch.equal(top_k_of(top, 2).values, torch.topk(acts, 2, dim=-1).values)


def test_wire_pairs_join_under_the_hook_name() -> None:
    acts = relu_acts(2)
    values, indices = torch.topk(acts, 3, dim=-1)
    tensors = {
        HOOK: torch.ones(2, 5, 8),
        f"{ACTS}.top_k_indices": indices.to(torch.int32),
        f"{ACTS}.top_k_values": values,
    }
    sizes = {f"d_sae[{HOOK}]": 40, "d_model": 8}
    shapes = {HOOK: ["batch", "pos", "d_model"]}  # ACTS unlisted: an SAE attached per request
    entries = gather_top_k(tensors, last_axis_sizes(shapes, sizes, [ACTS]))
    assert list(entries) == [HOOK, ACTS]
    top = entries[ACTS]
    assert isinstance(top, TopK) and top.width == 40 and top.indices.dtype == torch.int64
    assert torch.equal(top.to_dense().gather(-1, indices), values)
