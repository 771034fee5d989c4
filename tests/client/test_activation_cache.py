"""hooklab's ActivationCache gives what TransformerLens 3.9's gives, on the same weights and tokens.

Our cache wraps the server engine's ``run_with_cache`` dict with the engine as its model; the
reference is TransformerLens's own cache. Every analysis method is run with its main argument
combinations on GPT-2 (LayerNorm, absolute positions), Llama (RMSNorm, grouped-query attention)
and GPT-NeoX (parallel attention + MLP), each with default weight processing and with none (so
LayerNorm / RMSNorm weights and biases are live in ``ln_final``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from client_helpers import (
    assert_same,
    assert_same_outcome,
    cache_pair,
    single_token_string,
    tl_model,
    tokens,
)

from hooklab.activation_cache import ActivationCache

ARCHS = ("gpt2", "llama", "neox")


@pytest.fixture(params=ARCHS)
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.fixture(params=["processed", "unprocessed"])
def processing(request: pytest.FixtureRequest) -> str:
    return request.param


# ---- argument placeholders, resolved per model ----------------------------------------------

VEC, MAT = "<[d_model] projection>", "<[d_model, 3] projection>"


def _projection(d_model: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(d_model, *shape, generator=torch.Generator().manual_seed(7))


def resolve(kwargs: dict[str, Any], d_model: int) -> dict[str, Any]:
    out = dict(kwargs)
    for name, value in kwargs.items():
        if value is VEC:
            out[name] = _projection(d_model, ())
        elif value is MAT:
            out[name] = _projection(d_model, (3,))
    return out


def compare_method(
    checkpoint: Path, processing: str, method: str, kwargs: dict[str, Any], **pair: Any
) -> None:
    ours, ref = cache_pair(checkpoint, processing, **pair)
    kwargs = resolve(kwargs, ref.model.cfg.d_model)
    assert_same_outcome(
        lambda: getattr(ours, method)(**kwargs),
        lambda: getattr(ref, method)(**kwargs),
        f"{method}({kwargs})",
        # The engine's accumulated_bias raises ValueError where TransformerLens asserts.
        error_types=(ValueError,),
    )


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    method, kwargs = case
    args = ",".join(
        f"{k}={'vec' if v is VEC else 'mat' if v is MAT else v}" for k, v in kwargs.items()
    )
    return f"{method}({args})"


# ---- analysis methods -----------------------------------------------------------------------

METHOD_CASES: list[tuple[str, dict[str, Any]]] = [
    # accumulated_resid: the full stack recomputes ln_final per component, the others use the
    # cached ln1 / ln2 scale of the layer.
    ("accumulated_resid", {}),
    ("accumulated_resid", {"layer": 0}),
    ("accumulated_resid", {"layer": 1, "return_labels": True}),
    ("accumulated_resid", {"layer": 2, "return_labels": True}),
    ("accumulated_resid", {"incl_mid": True, "return_labels": True}),
    ("accumulated_resid", {"layer": 1, "mlp_input": True, "return_labels": True}),
    ("accumulated_resid", {"apply_ln": True}),
    ("accumulated_resid", {"apply_ln": True, "layer": -1, "return_labels": True}),
    ("accumulated_resid", {"apply_ln": True, "layer": 1}),
    ("accumulated_resid", {"apply_ln": True, "layer": 0}),
    ("accumulated_resid", {"apply_ln": True, "layer": 1, "mlp_input": True}),
    ("accumulated_resid", {"apply_ln": True, "incl_mid": True}),
    ("accumulated_resid", {"apply_ln": True, "pos_slice": -1}),
    ("accumulated_resid", {"apply_ln": True, "layer": 1, "pos_slice": (1, 5)}),
    ("accumulated_resid", {"apply_ln": True, "layer": 1, "pos_slice": 2}),
    ("accumulated_resid", {"pos_slice": [0, 3, 4]}),
    ("accumulated_resid", {"pos_slice": torch.tensor([4, 1])}),
    # decompose_resid
    ("decompose_resid", {}),
    ("decompose_resid", {"return_labels": True}),
    ("decompose_resid", {"layer": 0, "return_labels": True}),
    ("decompose_resid", {"layer": 1, "mlp_input": True, "return_labels": True}),
    ("decompose_resid", {"mode": "mlp", "return_labels": True}),
    ("decompose_resid", {"mode": "attn", "layer": 1, "mlp_input": True, "return_labels": True}),
    ("decompose_resid", {"incl_embeds": False, "return_labels": True}),
    ("decompose_resid", {"apply_ln": True}),
    ("decompose_resid", {"apply_ln": True, "layer": 1}),
    ("decompose_resid", {"apply_ln": True, "layer": 1, "mlp_input": True}),
    ("decompose_resid", {"apply_ln": True, "pos_slice": -1}),
    ("decompose_resid", {"apply_ln": True, "layer": 0, "pos_slice": (1, 5, 2)}),
    # stack_head_results (computed from hook_z and W_O: hook_result is not in the cache)
    ("stack_head_results", {}),
    ("stack_head_results", {"layer": 1, "return_labels": True}),
    ("stack_head_results", {"layer": 0, "return_labels": True}),
    ("stack_head_results", {"layer": 0, "incl_remainder": True, "return_labels": True}),
    ("stack_head_results", {"incl_remainder": True, "return_labels": True}),
    ("stack_head_results", {"layer": 1, "incl_remainder": True, "apply_ln": True}),
    ("stack_head_results", {"apply_ln": True}),
    ("stack_head_results", {"apply_ln": True, "layer": 1, "pos_slice": -1}),
    ("stack_head_results", {"pos_slice": [1, 3], "incl_remainder": True}),
    # stack_neuron_results
    ("stack_neuron_results", {"layer": 2, "return_labels": True}),
    ("stack_neuron_results", {"layer": -1}),
    ("stack_neuron_results", {"layer": 1, "incl_remainder": True, "return_labels": True}),
    ("stack_neuron_results", {"layer": 0, "return_labels": True}),
    ("stack_neuron_results", {"layer": 0, "incl_remainder": True}),
    ("stack_neuron_results", {"layer": 2, "apply_ln": True}),
    ("stack_neuron_results", {"layer": 1, "apply_ln": True, "incl_remainder": True}),
    ("stack_neuron_results", {"layer": 2, "neuron_slice": (0, 10), "return_labels": True}),
    ("stack_neuron_results", {"layer": 2, "neuron_slice": [1, 5, 7], "pos_slice": -1}),
    ("stack_neuron_results", {"layer": 1, "pos_slice": (0, 3), "apply_ln": True}),
    ("stack_neuron_results", {"layer": 2, "project_output_onto": VEC}),
    ("stack_neuron_results", {"layer": 2, "project_output_onto": MAT, "incl_remainder": True}),
    ("stack_neuron_results", {"layer": 2, "project_output_onto": VEC, "apply_ln": True}),
    (
        "stack_neuron_results",
        {"layer": 1, "project_output_onto": MAT, "apply_ln": True, "incl_remainder": True},
    ),
    ("stack_neuron_results", {"layer": 0, "project_output_onto": MAT, "apply_ln": True}),
    # get_neuron_results
    ("get_neuron_results", {"layer": 0}),
    ("get_neuron_results", {"layer": 1, "neuron_slice": (2, 8), "pos_slice": -1}),
    ("get_neuron_results", {"layer": 1, "neuron_slice": 3}),
    ("get_neuron_results", {"layer": 0, "project_output_onto": VEC}),
    ("get_neuron_results", {"layer": 1, "project_output_onto": MAT, "neuron_slice": [0, 4]}),
    # get_full_resid_decomposition
    ("get_full_resid_decomposition", {"return_labels": True}),
    ("get_full_resid_decomposition", {"layer": 1, "return_labels": True}),
    ("get_full_resid_decomposition", {"layer": 0, "return_labels": True}),
    ("get_full_resid_decomposition", {"layer": 1, "mlp_input": True, "return_labels": True}),
    ("get_full_resid_decomposition", {"layer": 0, "mlp_input": True}),
    ("get_full_resid_decomposition", {"mlp_input": True}),  # refused: no MLP after the last layer
    ("get_full_resid_decomposition", {"expand_neurons": False, "return_labels": True}),
    (
        "get_full_resid_decomposition",
        {"expand_neurons": False, "layer": 1, "mlp_input": True, "return_labels": True},
    ),
    ("get_full_resid_decomposition", {"apply_ln": True}),
    ("get_full_resid_decomposition", {"apply_ln": True, "expand_neurons": False}),
    ("get_full_resid_decomposition", {"apply_ln": True, "layer": 1, "mlp_input": True}),
    ("get_full_resid_decomposition", {"pos_slice": -1, "return_labels": True}),
    ("get_full_resid_decomposition", {"pos_slice": (1, 5), "apply_ln": True}),
    ("get_full_resid_decomposition", {"project_output_onto": VEC}),
    ("get_full_resid_decomposition", {"project_output_onto": MAT, "expand_neurons": False}),
    ("get_full_resid_decomposition", {"project_output_onto": MAT, "apply_ln": True}),
    # TL scales the fused neuron rows by ln1 even with mlp_input (heads and the rest: ln2).
    (
        "get_full_resid_decomposition",
        {"project_output_onto": MAT, "apply_ln": True, "layer": 1, "mlp_input": True},
    ),
    (
        "get_full_resid_decomposition",
        {"project_output_onto": VEC, "apply_ln": True, "expand_neurons": False, "layer": 1},
    ),
    # stack_activation
    ("stack_activation", {"activation_name": "resid_post"}),
    ("stack_activation", {"activation_name": "pattern", "layer": 1}),
    ("stack_activation", {"activation_name": "scale", "sublayer_type": "ln1"}),
    ("stack_activation", {"activation_name": "k"}),  # grouped-query: n_kv_heads heads
    ("stack_activation", {"activation_name": "post", "layer": 2}),
    ("stack_activation", {"activation_name": "resid_mid"}),  # NeoX has none: KeyError
]


def _expands_neurons(case: tuple[str, dict[str, Any]]) -> bool:
    method, kwargs = case
    if method == "get_full_resid_decomposition":
        return kwargs.get("expand_neurons", True)
    return method in ("stack_neuron_results", "get_neuron_results")


def _method_params() -> list[Any]:
    """Every case on every (architecture, processing), except that the per-neuron stacks (the
    slow ones; their code path does not depend on norm weights) skip unprocessed Llama / NeoX."""
    params = []
    for arch in ARCHS:
        for processing in ("processed", "unprocessed"):
            for case in METHOD_CASES:
                if processing == "unprocessed" and arch != "gpt2" and _expands_neurons(case):
                    continue
                params.append(
                    pytest.param(arch, processing, case, id=f"{arch}-{processing}-{case_id(case)}")
                )
    return params


@pytest.mark.parametrize("arch, processing_name, case", _method_params())
def test_method_matches_tl(
    request: pytest.FixtureRequest, arch: str, processing_name: str, case: tuple[str, dict]
) -> None:
    method, kwargs = case
    checkpoint = request.getfixturevalue(f"{arch}_checkpoint")
    compare_method(checkpoint, processing_name, method, kwargs)


# ---- methods that take a residual stack ------------------------------------------------------

# stack: which (TransformerLens-made) stack both caches get as input; "pos-1" = sliced at pos -1.
STACK_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("apply_ln_to_stack", "full", {}),
    ("apply_ln_to_stack", "full", {"layer": 1}),
    ("apply_ln_to_stack", "full", {"layer": 0, "mlp_input": True}),
    ("apply_ln_to_stack", "full", {"layer": -1, "recompute_ln": True}),
    ("apply_ln_to_stack", "full", {"layer": 1, "recompute_ln": True}),  # ignored below the top
    ("apply_ln_to_stack", "pos-1", {"pos_slice": -1}),
    ("apply_ln_to_stack", "pos-1", {"pos_slice": -1, "recompute_ln": True}),
    ("apply_ln_to_stack", "full", {"batch_slice": 1}),
    ("apply_ln_to_stack", "full", {"batch_slice": (0, 1), "layer": 1, "mlp_input": True}),
    ("apply_ln_to_stack", "full", {"batch_slice": [1, 0], "recompute_ln": True}),
    ("logit_attrs", "full", {"tokens": 5}),
    ("logit_attrs", "full", {"tokens": "<str>"}),
    ("logit_attrs", "full", {"tokens": torch.tensor(9)}),
    ("logit_attrs", "full", {"tokens": 5, "incorrect_tokens": 11}),
    ("logit_attrs", "full", {"tokens": "<str>", "incorrect_tokens": 11}),
    ("logit_attrs", "full", {"tokens": "<batch-pos>", "incorrect_tokens": "<batch-pos-2>"}),
    ("logit_attrs", "full", {"tokens": "<batch-pos>"}),
    ("logit_attrs", "pos-1", {"tokens": torch.tensor([3, 8]), "pos_slice": -1}),
    (
        "logit_attrs",
        "pos-1",
        {"tokens": torch.tensor([3, 8]), "incorrect_tokens": torch.tensor([4, 2]), "pos_slice": -1},
    ),
    ("logit_attrs", "full", {"tokens": torch.tensor([3, 8]), "incorrect_tokens": 4}),  # refused
    ("logit_attrs", "full", {"tokens": 5, "batch_slice": 0}),
    ("logit_attrs", "full", {"tokens": 5, "batch_slice": [1]}),
]


def _stack_input(ref: Any, kind: str) -> torch.Tensor:
    if kind == "pos-1":
        return ref.decompose_resid(pos_slice=-1)
    return ref.decompose_resid()


def _token_arg(value: Any, checkpoint: Path) -> Any:
    if value == "<str>":
        return single_token_string(checkpoint)[0]
    if value == "<batch-pos>":
        return tokens(checkpoint, 2) + 0
    if value == "<batch-pos-2>":
        return tokens(checkpoint, 2).flip(-1)
    return value


@pytest.mark.parametrize("case", STACK_CASES, ids=lambda c: case_id((f"{c[0]}[{c[1]}]", c[2])))
def test_stack_method_matches_tl(
    checkpoint: Path, processing: str, case: tuple[str, str, dict]
) -> None:
    method, stack_kind, kwargs = case
    ours, ref = cache_pair(checkpoint, processing)
    kwargs = {name: _token_arg(value, checkpoint) for name, value in kwargs.items()}
    stack = _stack_input(ref, stack_kind)
    assert_same_outcome(
        lambda: getattr(ours, method)(stack, **kwargs),
        lambda: getattr(ref, method)(stack, **kwargs),
        f"{method}({kwargs})",
    )


def test_logit_attrs_of_full_decomposition_sum_to_logit_difference(
    checkpoint: Path, processing: str
) -> None:
    """The headline DLA workflow, end to end, against TransformerLens."""
    ours, ref = cache_pair(checkpoint, processing)
    answer, wrong = single_token_string(checkpoint)[0], 17
    for cache_ in (ours, ref):
        stack, labels = cache_.get_full_resid_decomposition(
            apply_ln=True, pos_slice=-1, return_labels=True
        )
        cache_.attrs = cache_.logit_attrs(stack, answer, wrong, pos_slice=-1)  # type: ignore[union-attr]
        cache_.labels = labels  # type: ignore[union-attr]
    assert_same(ours.labels, ref.labels, "labels")  # type: ignore[attr-defined]
    assert_same(ours.attrs, ref.attrs, "logit_attrs")  # type: ignore[attr-defined]


# ---- batch axis ------------------------------------------------------------------------------

# how: "run_with_cache" = run_with_cache(remove_batch_dim=True); "method" = cache.remove_batch_dim()
BATCHLESS_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("run_with_cache", "accumulated_resid", {"apply_ln": True, "return_labels": True}),
    ("method", "accumulated_resid", {"apply_ln": True, "return_labels": True}),
    ("run_with_cache", "accumulated_resid", {"apply_ln": True, "pos_slice": -1}),
    ("method", "accumulated_resid", {"apply_ln": True, "layer": 1, "mlp_input": True}),
    ("run_with_cache", "decompose_resid", {"apply_ln": True, "pos_slice": (1, 4)}),
    ("method", "stack_head_results", {"apply_ln": True, "incl_remainder": True}),
    ("run_with_cache", "stack_head_results", {"pos_slice": -1, "layer": 1}),
    ("method", "stack_neuron_results", {"layer": 2, "apply_ln": True, "incl_remainder": True}),
    (
        "run_with_cache",
        "stack_neuron_results",
        {"layer": 1, "project_output_onto": MAT, "apply_ln": True},
    ),
    ("method", "get_neuron_results", {"layer": 1, "pos_slice": -1}),
    ("run_with_cache", "get_full_resid_decomposition", {"apply_ln": True, "return_labels": True}),
    ("method", "get_full_resid_decomposition", {"expand_neurons": False, "pos_slice": -1}),
    ("run_with_cache", "stack_activation", {"activation_name": "z"}),
]


@pytest.mark.parametrize("case", BATCHLESS_CASES, ids=lambda c: f"{c[0]}-{case_id(c[1:])}")
def test_batchless_cache_matches_tl(
    checkpoint: Path, processing: str, case: tuple[str, str, dict]
) -> None:
    """``run_with_cache(remove_batch_dim=True)`` and ``cache.remove_batch_dim()``."""
    how, method, kwargs = case
    if how == "run_with_cache":
        compare_method(checkpoint, processing, method, kwargs, batch=1, remove_batch_dim=True)
        return
    ours, ref = cache_pair(checkpoint, processing, batch=1)
    assert ours.remove_batch_dim() is ours
    ref.remove_batch_dim()
    assert ours.has_batch_dim is False
    kwargs = resolve(kwargs, ref.model.cfg.d_model)
    assert_same_outcome(
        lambda: getattr(ours, method)(**kwargs), lambda: getattr(ref, method)(**kwargs), method
    )


def test_remove_batch_dim_entries_match_tl(checkpoint: Path) -> None:
    ours, ref = cache_pair(checkpoint, "processed", batch=1)
    ours.remove_batch_dim()
    ref.remove_batch_dim()
    assert list(ours.keys()) == list(ref.keys())
    for name in ref:
        assert_same(ours[name], ref[name], name)


def test_logit_attrs_without_batch_dim(checkpoint: Path, processing: str) -> None:
    ours, ref = cache_pair(checkpoint, processing, batch=1, remove_batch_dim=True)
    stack = ref.accumulated_resid(pos_slice=-1)  # [n, d]
    # Without pos_slice the [pos, 1] scale broadcasts against [n, d] rows: TL refuses, so do we.
    assert_same_outcome(
        lambda: ours.logit_attrs(stack, 5, has_batch_dim=False),
        lambda: ref.logit_attrs(stack, 5, has_batch_dim=False),
        "unsliced scale",
    )
    for kwargs in (
        {"tokens": 5, "pos_slice": -1},
        {"tokens": 5, "incorrect_tokens": 6, "pos_slice": -1},
    ):
        assert_same(
            ours.logit_attrs(stack, has_batch_dim=False, **kwargs),
            ref.logit_attrs(stack, has_batch_dim=False, **kwargs),
            str(kwargs),
        )


def test_remove_batch_dim_refuses_a_batch(gpt2_checkpoint: Path, caplog: Any) -> None:
    ours, ref = cache_pair(gpt2_checkpoint, "processed", batch=2)
    with pytest.raises(AssertionError):
        ref.remove_batch_dim()
    with pytest.raises(AssertionError):
        ours.remove_batch_dim()
    # A second removal only warns, as in TransformerLens.
    ours, _ = cache_pair(gpt2_checkpoint, "processed", batch=1)
    ours.remove_batch_dim()
    with caplog.at_level(logging.WARNING):
        assert ours.remove_batch_dim() is ours
    assert "already" in caplog.text


@pytest.mark.parametrize("batch_slice", [0, -1, (0, 1), [1, 0], torch.tensor([1]), None])
def test_apply_slice_to_batch_dim_matches_tl(checkpoint: Path, batch_slice: Any) -> None:
    ours, ref = cache_pair(checkpoint, "unprocessed")
    ours_sliced = ours.apply_slice_to_batch_dim(batch_slice)
    ref_sliced = ref.apply_slice_to_batch_dim(batch_slice)
    assert isinstance(ours_sliced, ActivationCache) and ours_sliced is not ours
    assert ours_sliced.has_batch_dim == ref_sliced.has_batch_dim
    assert list(ours_sliced.keys()) == list(ref_sliced.keys())
    for name in ref_sliced:
        assert_same(ours_sliced[name], ref_sliced[name], name)
    kwargs = {"apply_ln": True, "return_labels": True, "expand_neurons": False}
    assert_same(
        ours_sliced.get_full_resid_decomposition(**kwargs),
        ref_sliced.get_full_resid_decomposition(**kwargs),
        "get_full_resid_decomposition after slicing",
    )
    assert_same(
        ours_sliced.accumulated_resid(apply_ln=True),
        ref_sliced.accumulated_resid(apply_ln=True),
        "accumulated_resid after slicing",
    )


def test_apply_slice_to_batch_dim_needs_a_batch_dim(gpt2_checkpoint: Path) -> None:
    ours, ref = cache_pair(gpt2_checkpoint, "processed", batch=1, remove_batch_dim=True)
    with pytest.raises(AssertionError):
        ref.apply_slice_to_batch_dim(0)
    with pytest.raises(AssertionError):
        ours.apply_slice_to_batch_dim(0)


# ---- head results ----------------------------------------------------------------------------


def test_compute_head_results_matches_tl_and_hook_result(checkpoint: Path, processing: str) -> None:
    ours, ref = cache_pair(checkpoint, processing)
    assert "blocks.0.attn.hook_result" not in ours
    ours.compute_head_results()
    ref.compute_head_results()
    assert list(ours.keys()) == list(ref.keys())
    # The real per-head outputs of TransformerLens's forward (use_attn_result) agree too.
    model = tl_model(checkpoint, processing)
    model.set_use_attn_result(True)
    try:
        _, real = model.run_with_cache(tokens(checkpoint, 2), names_filter=lambda n: "result" in n)
    finally:
        model.set_use_attn_result(False)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_result"
        assert_same(ours[name], ref[name], name)
        assert_same(ours[name], real[name], f"{name} vs use_attn_result")


def test_compute_head_results_twice_warns_and_keeps_values(gpt2_checkpoint: Path, caplog) -> None:
    ours, _ = cache_pair(gpt2_checkpoint, "processed")
    ours.compute_head_results()
    first = ours["result", 0]
    with caplog.at_level(logging.WARNING):
        ours.compute_head_results()
    assert "already cached" in caplog.text
    assert ours["result", 0] is first


# ---- indexing and dict protocol --------------------------------------------------------------

INDEX_KEYS: list[Any] = [
    "blocks.1.hook_resid_post",
    "hook_embed",
    "embed",
    "k1",
    "q0",
    "pattern1",
    "scale",
    "normalized",
    "scale0ln1",
    "normalized1ln2",
    "post1",
    "pre0",
    ("resid_post", 1),
    ("resid_post", -1),
    ("resid_pre", -2),
    ("pattern", 0),
    ("attn", 0),
    ("attn_logits", 1),
    ("q", 0, "attn"),
    ("q", 0, "a"),
    ("v", 1, "attention"),
    ("scale", 0, "ln1"),
    ("normalized", 1, "ln2"),
    ("post", 1),
    ("mlp_post", 1),
    ("resid_pre", 1, None),
    ("resid_pre", 1, "b"),
    ("scale",),
    ("mlp_out", 0),
    ("rot_k", 1),  # rotary models only: KeyError on GPT-2
    ("resid_mid", 0),  # not on NeoX (parallel attention + MLP)
    "resid_pre1",  # TL's shorthand cannot contain "_": KeyError
    ("scale", 1),  # "blocks.1.hook_scale" is no hook: KeyError
]


@pytest.mark.parametrize("key", INDEX_KEYS, ids=str)
def test_indexing_matches_tl(checkpoint: Path, key: Any) -> None:
    ours, ref = cache_pair(checkpoint, "processed")
    assert_same_outcome(lambda: ours[key], lambda: ref[key], f"cache[{key!r}]")


def test_dict_protocol_matches_tl(checkpoint: Path) -> None:
    ours, ref = cache_pair(checkpoint, "processed")
    assert list(ours.keys()) == list(ref.keys())
    assert list(ours) == list(ref)
    assert len(ours) == len(ref)
    assert repr(ours) == repr(ref)
    assert [k for k, _ in ours.items()] == [k for k, _ in ref.items()]
    for (name, mine), theirs in zip(ours.items(), ref.values(), strict=True):
        assert_same(mine, theirs, name)
    assert len(list(ours.values())) == len(ref)
    for name in ("hook_embed", "blocks.0.hook_resid_pre", "nope", "embed"):
        assert (name in ours) == (name in ref), name
    assert ours.has_embed == ref.has_embed
    assert ours.has_pos_embed == ref.has_pos_embed


def test_to_moves_and_returns_self(gpt2_checkpoint: Path) -> None:
    ours, ref = cache_pair(gpt2_checkpoint, "processed")
    assert ours.to("cpu") is ours
    assert ours.to(torch.device("cpu")) is ours
    for name in ref:
        assert_same(ours[name], ref.to("cpu")[name], name)


def test_toggle_autodiff_sets_global_grad_mode(gpt2_checkpoint: Path) -> None:
    ours, _ = cache_pair(gpt2_checkpoint, "processed")
    before = torch.is_grad_enabled()
    try:
        ours.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        ours.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(before)


# ---- partial caches --------------------------------------------------------------------------


def test_cache_without_embeddings_matches_tl(gpt2_checkpoint: Path) -> None:
    """A names_filter that leaves out hook_embed / hook_pos_embed drops those rows, as in TL."""
    ours, ref = cache_pair(gpt2_checkpoint, "processed")
    for cache_ in (ours, ref):
        for name in ("hook_embed", "hook_pos_embed"):
            del cache_.cache_dict[name]
    ours = ActivationCache(ours.cache_dict, ours.model)
    ref = type(ref)(ref.cache_dict, ref.model)
    assert not ours.has_embed and not ours.has_pos_embed
    for method, kwargs in (
        ("decompose_resid", {"return_labels": True}),
        ("get_full_resid_decomposition", {"return_labels": True, "expand_neurons": False}),
    ):
        assert_same(getattr(ours, method)(**kwargs), getattr(ref, method)(**kwargs), method)


def test_missing_scale_is_a_key_error(llama_checkpoint: Path) -> None:
    ours, ref = cache_pair(llama_checkpoint, "processed")
    for cache_ in (ours, ref):
        del cache_.cache_dict["ln_final.hook_scale"]
    stack = ref.decompose_resid()
    with pytest.raises(KeyError):
        ref.apply_ln_to_stack(stack)
    with pytest.raises(KeyError, match=r"ln_final\.hook_scale"):
        ours.apply_ln_to_stack(stack)


def test_int_neuron_slice_keeps_the_neuron_axis(checkpoint: Path) -> None:
    """TransformerLens 3.9 fails on an int neuron_slice (it iterates a 0-d tensor for the
    labels); hooklab treats it as a one-element list, which TL does support."""
    ours, ref = cache_pair(checkpoint, "processed")
    with pytest.raises(TypeError):
        ref.stack_neuron_results(2, neuron_slice=3)
    assert_same(
        ours.stack_neuron_results(2, neuron_slice=3, return_labels=True, incl_remainder=True),
        ref.stack_neuron_results(2, neuron_slice=[3], return_labels=True, incl_remainder=True),
        "stack_neuron_results(neuron_slice=3)",
    )
