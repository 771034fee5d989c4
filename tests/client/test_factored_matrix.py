"""hooklab's FactoredMatrix against TransformerLens 3.9's, property by property.

Random factors (with and without leading batch axes, broadcasting, square and not) and the real
QK / OV circuits of the fixture models: ours built from the engine's stacked weights, TL's from
``HookedTransformer.QK`` / ``.OV``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from client_helpers import assert_same, assert_same_outcome, our_model, tl_model
from transformer_lens import FactoredMatrix as TLFactoredMatrix

from hooklab.factored_matrix import FactoredMatrix

# (A shape, B shape): plain, tall/wide, batched, broadcast leading axes, square.
SHAPES: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    ((5, 3), (3, 4)),
    ((4, 7), (7, 6)),
    ((6, 2), (2, 6)),
    ((2, 5, 3), (3, 4)),
    ((2, 1, 6, 3), (4, 3, 6)),
    ((3, 4, 4), (3, 4, 4)),
]


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pair(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> tuple[FactoredMatrix, TLFactoredMatrix]:
    A, B = _random(a_shape, 1, dtype), _random(b_shape, 2, dtype)
    return FactoredMatrix(A, B), TLFactoredMatrix(A, B)


def _fm_parts(fm: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """A factored matrix as comparable values (or a tensor as itself)."""
    if isinstance(fm, FactoredMatrix | TLFactoredMatrix):
        return (fm.A, fm.B, torch.Size(fm.shape))
    return fm


def _same(ours: Callable[[], Any], ref: Callable[[], Any], what: str) -> None:
    assert_same_outcome(lambda: _fm_parts(ours()), lambda: _fm_parts(ref()), what)


PROPERTIES: dict[str, Callable[[Any], Any]] = {
    "A": lambda m: m.A,
    "B": lambda m: m.B,
    "dims": lambda m: (m.ldim, m.mdim, m.rdim, m.ndim, m.has_leading_dims, torch.Size(m.shape)),
    "AB": lambda m: m.AB,
    "BA": lambda m: m.BA,
    "T": lambda m: m.T,
    "svd": lambda m: m.svd(),
    "U": lambda m: m.U,
    "S": lambda m: m.S,
    "V": lambda m: m.V,
    "eigenvalues": lambda m: m.eigenvalues,
    "norm": lambda m: m.norm(),
    "make_even": lambda m: m.make_even(),
    "make_even.AB": lambda m: m.make_even().AB,
    "collapse_l": lambda m: m.collapse_l(),
    "collapse_r": lambda m: m.collapse_r(),
    "get_corner": lambda m: m.get_corner(),
    "get_corner(2)": lambda m: m.get_corner(2),
    "unsqueeze(0)": lambda m: m.unsqueeze(0),
    "unsqueeze(-3)": lambda m: m.unsqueeze(-3),
    "pair": lambda m: m.pair,
    "repr": lambda m: repr(m),
    "T.T": lambda m: m.T.T.AB,
    "scaled 2.5": lambda m: m * 2.5,
    "rscaled 3": lambda m: 3 * m,
    "scaled tensor": lambda m: m * torch.tensor([0.5], dtype=m.A.dtype),
    "scaled bad tensor": lambda m: m * torch.ones(2, dtype=m.A.dtype),
}


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_properties_match_tl(shapes: tuple, prop: str) -> None:
    ours, ref = _pair(*shapes)
    get = PROPERTIES[prop]
    _same(lambda: get(ours), lambda: get(ref), prop)


def test_svd_reconstructs_and_vh_is_deprecated_v() -> None:
    ours, ref = _pair((2, 5, 3), (3, 4))
    U, S, V = ours.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), ours.AB)
    torch.testing.assert_close(ours.norm(), torch.linalg.matrix_norm(ours.AB))
    with pytest.warns(DeprecationWarning):
        vh = ours.Vh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert_same(vh, ref.Vh, "Vh")
    assert ours.svd() is ours.svd()  # computed once per instance


def test_half_precision_eigenvalues_match_tl() -> None:
    ours, ref = _pair((4, 2), (2, 4), dtype=torch.bfloat16)
    torch.testing.assert_close(ours.eigenvalues, ref.eigenvalues)
    assert ours.eigenvalues.dtype == ref.eigenvalues.dtype


# ---- products ---------------------------------------------------------------------------------

MATMULS: dict[str, Callable[[Any, Any], Any]] = {
    # right operands (ldim, mdim, rdim of the fixture below: 5, 3, 4 and 3, 6, 2)
    "@ vector": lambda m, x: m @ x["vec_r"],
    "@ matrix": lambda m, x: m @ x["mat_r"],
    "@ batched matrix": lambda m, x: m @ x["batched_r"],
    "@ wrong matrix": lambda m, x: m @ x["mat_l"].T,
    "@ factored": lambda m, x: m @ x["fm_r"](type(m)),
    "@ factored.AB": lambda m, x: (m @ x["fm_r"](type(m))).AB,
    "vector @": lambda m, x: x["vec_l"] @ m,
    "matrix @": lambda m, x: x["mat_l"] @ m,
    "batched matrix @": lambda m, x: x["batched_l"] @ m,
    "rmatmul factored": lambda m, x: m.__rmatmul__(x["fm_l"](type(m))),
    "wrong matrix @": lambda m, x: x["mat_r"].T @ m,
}


def _operands(ldim: int, rdim: int) -> dict[str, Any]:
    return {
        "vec_r": _random((rdim,), 3),
        "vec_l": _random((ldim,), 4),
        "mat_r": _random((rdim, 2), 5),
        "mat_l": _random((7, ldim), 6),
        "batched_r": _random((3, rdim, 8), 7),
        "batched_l": _random((3, 1, ldim), 8),
        "fm_r": lambda cls: cls(_random((rdim, 2), 9), _random((2, 5), 10)),
        "fm_l": lambda cls: cls(_random((6, 3), 11), _random((3, ldim), 12)),
    }


@pytest.mark.parametrize("op", list(MATMULS))
@pytest.mark.parametrize("shapes", [((5, 3), (3, 4)), ((3, 6), (6, 2)), ((2, 5, 3), (3, 4))])
def test_matmul_matches_tl(shapes: tuple, op: str) -> None:
    ours, ref = _pair(*shapes)
    operands = _operands(ours.ldim, ours.rdim)
    _same(lambda: MATMULS[op](ours, operands), lambda: MATMULS[op](ref, operands), op)


# ---- indexing ----------------------------------------------------------------------------------

INDICES: list[Any] = [
    0,
    -1,
    (1,),
    (0, 2),
    (slice(None), 1),
    (1, slice(0, 2)),
    (0, 1, 2),
    (0, -1, -1),
    (1, 2, slice(1, 3)),
    (None, 0),
    (0, 1, 2, 3),
    (slice(None), slice(None), 0),
]


@pytest.mark.parametrize("index", INDICES, ids=repr)
@pytest.mark.parametrize("shapes", [((2, 5, 3), (3, 4)), ((2, 1, 6, 3), (4, 3, 6))], ids=str)
def test_getitem_matches_tl(shapes: tuple, index: Any) -> None:
    ours, ref = _pair(*shapes)
    _same(lambda: ours[index], lambda: ref[index], f"[{index!r}]")
    _same(lambda: ours[index].AB, lambda: ref[index].AB, f"[{index!r}].AB")


def test_constructor_errors_match_tl() -> None:
    for a_shape, b_shape in (((5, 3), (4, 2)), ((2, 5, 3), (3, 3, 4))):
        A, B = _random(a_shape, 0), _random(b_shape, 1)
        for cls in (TLFactoredMatrix, FactoredMatrix):
            with pytest.raises((AssertionError, RuntimeError)) as info:
                cls(A, B)
            if cls is TLFactoredMatrix:
                expected = info.type
            else:
                assert info.type is expected


# ---- the models' QK and OV circuits -------------------------------------------------------------


@pytest.fixture(params=["gpt2", "llama"])
def circuits(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    checkpoint: Path = request.getfixturevalue(f"{request.param}_checkpoint")
    ours_model, ref_model = our_model(checkpoint, "processed"), tl_model(checkpoint, "processed")
    ours = {
        "QK": FactoredMatrix(ours_model.W_Q, ours_model.W_K.transpose(-2, -1)),
        "OV": FactoredMatrix(ours_model.W_V, ours_model.W_O),
    }
    return ours, {"QK": ref_model.QK, "OV": ref_model.OV}


CIRCUIT_PROPERTIES = (
    "dims", "AB", "BA", "S", "U", "V", "norm", "eigenvalues", "collapse_l", "collapse_r",
    "get_corner", "make_even.AB", "T.T",
)  # fmt: skip


@pytest.mark.parametrize("circuit", ["QK", "OV"])
def test_model_circuits_match_tl(circuits: tuple[dict, dict], circuit: str) -> None:
    ours, ref = circuits[0][circuit], circuits[1][circuit]
    for prop in CIRCUIT_PROPERTIES:
        get = PROPERTIES[prop]
        _same(lambda get=get: get(ours), lambda get=get: get(ref), f"{circuit}.{prop}")
    # Indexing a layer and a head, and composing circuits (as composition scores do).
    _same(lambda: ours[1, 2].AB, lambda: ref[1, 2].AB, f"{circuit}[1, 2]")
    _same(
        lambda: (ours[0, 1] @ ours[1, 0]).AB,
        lambda: (ref[0, 1] @ ref[1, 0]).AB,
        f"{circuit} composed",
    )
