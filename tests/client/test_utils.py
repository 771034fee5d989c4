"""hooklab.utils (get_act_name, Slice) and hooklab_analysis._norm against TransformerLens 3.9's
own."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from client_helpers import assert_same, assert_same_outcome
from hooklab_analysis._norm import apply_norm, normalize
from transformer_lens import HookedTransformerConfig
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
from transformer_lens.utilities import Slice as TLSlice
from transformer_lens.utilities import get_act_name as tl_get_act_name_new

from hooklab.utils import Slice, get_act_name, get_corner, transpose

with warnings.catch_warnings():  # transformer_lens.utils is deprecated in 3.x; it still works
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens.utils import get_act_name as tl_get_act_name


# ---- get_act_name ----------------------------------------------------------------------------

NAMES = (
    "embed", "pos_embed", "tokens", "resid_pre", "resid_mid", "resid_post", "attn_out",
    "mlp_out", "q", "k", "v", "z", "result", "pattern", "attn_scores", "rot_q", "rot_k", "attn",
    "attn_logits", "key", "query", "value", "pre", "post", "mid", "pre_linear", "mlp_pre",
    "mlp_mid", "mlp_post", "scale", "normalized", "attn_in", "q_input", "k_input", "v_input",
    "mlp_in", "hook_embed", "blocks.3.hook_resid_post", "ln_final.hook_scale",
    # packed shorthand, incl. the forms TL gets "wrong" (resid_pre5 keeps its digits)
    "k6", "pre5", "scale4ln1", "normalized27ln2", "q0a", "z12attn", "resid_pre5", "ln1",
    "attn3", "post2m", "resid0b", "x", "",
)  # fmt: skip
LAYERS = (None, 0, 3, 11, "7")
LAYER_TYPES = (None, "", "a", "attn", "attention", "m", "mlp", "b", "block", "blocks", "ln1",
               "ln2", "ln_final", "other")  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_get_act_name_matches_tl_on_a_grid(name: str) -> None:
    for layer, layer_type in itertools.product(LAYERS, LAYER_TYPES):
        expected = tl_get_act_name(name, layer, layer_type)
        assert get_act_name(name, layer, layer_type) == expected, (name, layer, layer_type)
        assert tl_get_act_name_new(name, layer, layer_type) == expected


@pytest.mark.parametrize(
    "args, expected",
    [
        (("k", 6, "a"), "blocks.6.attn.hook_k"),
        (("pre", 2), "blocks.2.mlp.hook_pre"),
        (("embed",), "hook_embed"),
        (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
        (("k6",), "blocks.6.attn.hook_k"),
        (("scale4ln1",), "blocks.4.ln1.hook_scale"),
        (("scale",), "ln_final.hook_scale"),
        (("scale", 3), "blocks.3.hook_scale"),
        (("attn", 3), "blocks.3.attn.hook_pattern"),
        (("resid_pre5",), "hook_resid_pre5"),
    ],
)
def test_get_act_name_documented_examples(args: tuple, expected: str) -> None:
    assert get_act_name(*args) == expected == tl_get_act_name(*args)


# ---- Slice -----------------------------------------------------------------------------------

SLICE_INPUTS: list[Any] = [
    None,
    0,
    2,
    -1,
    (3,),
    (1, 4),
    (0, 5, 2),
    (-3, None),
    [0, 2],
    [3, 1, 3],
    torch.tensor([1, 0]),
    torch.tensor(2),
    torch.tensor([True, False, True, False, True]),
    np.array([4, 0]),
    slice(1, None, 2),
    True,
]


@pytest.mark.parametrize("value", SLICE_INPUTS, ids=repr)
def test_slice_matches_tl(value: Any) -> None:
    ours, ref = Slice(value), TLSlice(value)
    assert ours.mode == ref.mode
    x = torch.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
    for dim in (1, 2, -2):
        assert_same(ours.apply(x, dim=dim), ref.apply(x, dim=dim), f"dim={dim}")
    if ref.mode != "int":
        assert_same(ours.indices(5), torch.as_tensor(ref.indices(5)), "indices")
    else:
        assert_same(ours.indices(), torch.as_tensor(ref.indices()), "indices")
    unwrapped, ref_unwrapped = Slice.unwrap(value), TLSlice.unwrap(value)
    assert unwrapped.mode == ref_unwrapped.mode
    assert_same_outcome(
        lambda: unwrapped.apply(x, dim=1), lambda: ref_unwrapped.apply(x, dim=1), "unwrap"
    )
    assert Slice.unwrap(ours) is ours


def test_slice_rejects_what_tl_rejects() -> None:
    for bad in ("3", 1.5, {1, 2}):
        with pytest.raises(ValueError):
            TLSlice(bad)
        with pytest.raises(ValueError):
            Slice(bad)
    with pytest.raises(ValueError):
        Slice((1, 2)).indices()


def test_tensor_helpers() -> None:
    x = torch.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert transpose(x).shape == (4, 6, 5)
    assert torch.equal(get_corner(x, 2), x[:2, :2, :2])


# ---- norms (hooklab_analysis._norm) vs TransformerLens's modules -----------------------------

TL_NORMS = {"LN": LayerNorm, "LNPre": LayerNormPre, "RMS": RMSNorm, "RMSPre": RMSNormPre}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(TL_NORMS))
def test_normalize_matches_tl_modules(kind: str, dtype: torch.dtype) -> None:
    d_model = 16
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, act_fn="gelu",
        normalization_type=kind, eps=1e-5, dtype=dtype,
    )  # fmt: skip
    module = TL_NORMS[kind](cfg)
    generator = torch.Generator().manual_seed(0)
    w = b = None
    with torch.no_grad():
        if hasattr(module, "w"):
            module.w.copy_(1 + 0.3 * torch.randn(d_model, generator=generator))
            w = module.w.detach()
        if hasattr(module, "b"):
            module.b.copy_(0.2 * torch.randn(d_model, generator=generator))
            b = module.b.detach()
    x = (3 * torch.randn(2, 5, d_model, generator=generator) + 1).to(dtype)
    expected = module(x).detach()
    ours = normalize(x, kind, cfg.eps, w, b)
    assert ours.dtype == expected.dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(ours, expected, atol=tol, rtol=tol)


class _Cfg:
    normalization_type = "LN"
    eps = 1e-5
    final_rms = True


class _Model:
    """Just enough model for apply_norm: a cfg and parameter(name)."""

    cfg = _Cfg()

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params

    def parameter(self, name: str) -> torch.Tensor:
        return self.params[name]


def test_apply_norm_reads_weights_and_final_rms() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    w, b = torch.linspace(0.5, 1.5, 8), torch.linspace(-0.1, 0.1, 8)
    model = _Model({"ln_final.w": w, "ln_final.b": b, "blocks.0.ln1.w": w, "blocks.0.ln1.b": b})
    # final_rms: ln_final of an LN model is an RMSNorm (no centring, no bias), as in TL.
    torch.testing.assert_close(apply_norm(model, x), normalize(x, "RMS", 1e-5, w))
    torch.testing.assert_close(apply_norm(model, x, "blocks.0.ln1"), normalize(x, "LN", 1e-5, w, b))
    # No weights (a processed model): the bare normalisation.
    torch.testing.assert_close(apply_norm(_Model({}), x, "blocks.0.ln1"), normalize(x, "LN", 1e-5))
    with pytest.raises(ValueError):
        normalize(x, "BatchNorm", 1e-5)
