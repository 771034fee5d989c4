"""The remote client against TransformerLens 3.9 run locally on the same weights.

Every hook spec is compared with the equivalent plain Python hook function run by
``tl.run_with_hooks``; every other call with the same TransformerLens call. Logits within 1e-4.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hooklab import hooks

from .e2e_helpers import (
    assert_close,
    axes_of,
    edit,
    selection_index,
    selection_shape,
    write_selection,
)
from .e2e_servers import PROMPTS, Served, sample_tokens

Hooks = list[tuple[Any, Any]]
Case = Callable[[Served, torch.Tensor], tuple[Hooks, Hooks]]


def _vector(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def _simple(name: str, spec: Any, full: Callable[[torch.Tensor], torch.Tensor], **sel: Any) -> Case:
    """A case where the spec replaces the selection by ``full(x)`` (computed on the whole x)."""

    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        return [(name, spec)], [(name, edit(full, axes_of(name), sel))]

    return case


def _case_patch_cache(name: str, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        clean = sample_tokens(served.tl, seed=7)
        _, stored = served.model.run_with_cache(clean, names_filter=[name], store=True)
        cache_id = stored.cache_id
        assert isinstance(cache_id, str) and cache_id
        _, ref_cache = served.tl.run_with_cache(clean, names_filter=[name])
        source = ref_cache[name]
        return [(name, hooks.patch(cache_id, **sel))], [
            (name, edit(lambda x: source, axes_of(name), sel))
        ]

    return case


def _case_patch_tensor(name: str, selection_shaped: bool, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        _, ref_cache = served.tl.run_with_cache(tokens, names_filter=[name])
        shape = tuple(ref_cache[name].shape)
        axes = axes_of(name)
        if selection_shaped:
            value = _vector(*selection_shape(shape, axes, sel), seed=1)
            ref = write_selection(lambda x: value, axes, sel)
        else:
            value = _vector(*shape, seed=2)
            ref = edit(lambda x: value, axes, sel)
        return [(name, hooks.patch(value, **sel))], [(name, ref)]

    return case


def _case_patch_row(name: str, row: int, **sel: Any) -> Case:
    def full(x: torch.Tensor) -> torch.Tensor:
        return x[row : row + 1].expand_as(x)

    return _simple(name, hooks.patch(source_row=row, **sel), full, **sel)


def _case_steer(name: str, coeff: float, stored: bool = False, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        _, ref_cache = served.tl.run_with_cache(
            tokens, names_filter=lambda n: fnmatch.fnmatch(n, name)
        )
        width = next(iter(ref_cache.values())).shape[-1]
        vector = _vector(width, seed=3)
        sent: Any = served.model.store_tensor(vector) if stored else vector
        ref = edit(lambda x: x + coeff * vector, axes_of(name), sel)
        tl_name = (lambda n: fnmatch.fnmatch(n, name)) if "*" in name else name
        return [(name, hooks.steer(sent, coeff, **sel))], [(tl_name, ref)]

    return case


def _case_steer_selection_shaped(name: str, coeff: float, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        _, ref_cache = served.tl.run_with_cache(tokens, names_filter=[name])
        axes = axes_of(name)
        vector = _vector(*selection_shape(tuple(ref_cache[name].shape), axes, sel), seed=3)

        def ref(x: torch.Tensor, hook: Any) -> torch.Tensor:
            index = selection_index(tuple(x.shape), axes, sel)
            out = x.clone()
            out[index] = x[index] + coeff * vector
            return out

        return [(name, hooks.steer(vector, coeff, **sel))], [(name, ref)]

    return case


def _case_project_out(name: str, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        direction = _vector(served.tl.cfg.d_model, seed=11) * 3

        def full(x: torch.Tensor) -> torch.Tensor:
            unit = direction / direction.norm()
            return x - (x @ unit)[..., None] * unit

        tl_name = (lambda n: fnmatch.fnmatch(n, name)) if "*" in name else name
        return [(name, hooks.project_out(direction, **sel))], [
            (tl_name, edit(full, axes_of(name), sel))
        ]

    return case


def _case_set_tensor(name: str, **sel: Any) -> Case:
    def case(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
        value = _vector(served.tl.cfg.d_model, seed=5)
        return [(name, hooks.set(value, **sel))], [
            (name, write_selection(lambda x: value, axes_of(name), sel))
        ]

    return case


def _case_predicate(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
    predicate = lambda n: n.endswith("attn.hook_z")  # noqa: E731
    return [(predicate, hooks.ablate(head=[0]))], [
        (predicate, edit(torch.zeros_like, "bphd", {"head": [0]}))
    ]


def _case_glob_scale(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
    pattern = "blocks.*.hook_attn_out"
    return [(pattern, hooks.scale(0.3))], [
        (lambda n: fnmatch.fnmatch(n, pattern), edit(lambda x: x * 0.3, "bpd", {}))
    ]


def _case_several(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
    vector = _vector(served.tl.cfg.d_model, seed=9)
    return (
        [
            ("blocks.0.attn.hook_z", hooks.ablate(head=[1], pos=[2, 3])),
            ("blocks.1.hook_resid_pre", hooks.steer(vector, 2.0, pos=[-1])),
            ("blocks.1.hook_resid_pre", hooks.scale(0.5, batch=[0])),
        ],
        [
            ("blocks.0.attn.hook_z", edit(torch.zeros_like, "bphd", {"head": [1], "pos": [2, 3]})),
            ("blocks.1.hook_resid_pre", edit(lambda x: x + 2.0 * vector, "bpd", {"pos": [-1]})),
            ("blocks.1.hook_resid_pre", edit(lambda x: x * 0.5, "bpd", {"batch": [0]})),
        ],
    )


def _case_gqa_k(served: Served, tokens: torch.Tensor) -> tuple[Hooks, Hooks]:
    name = "blocks.1.attn.hook_k"
    return [(name, hooks.ablate(head=[-1], pos=[0, 1]))], [
        (name, edit(torch.zeros_like, "bphd", {"head": [-1], "pos": [0, 1]}))
    ]


def _mean(axis: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.mean(axis, keepdim=True).expand_as(x)


CASES: dict[str, Case] = {
    "ablate_zero": _simple("blocks.0.hook_resid_post", hooks.ablate(), torch.zeros_like),
    "ablate_zero_pos": _simple(
        "blocks.0.hook_resid_post", hooks.ablate(pos=[1, 3]), torch.zeros_like, pos=[1, 3]
    ),
    "ablate_zero_head_z": _simple(
        "blocks.0.attn.hook_z", hooks.ablate(head=2), torch.zeros_like, head=2
    ),
    "ablate_zero_head_pos_z": _simple(
        "blocks.1.attn.hook_z",
        hooks.ablate(head=[1], pos=[-1]),
        torch.zeros_like,
        head=[1],
        pos=[-1],
    ),
    "ablate_zero_batch": _simple(
        "blocks.1.hook_resid_pre", hooks.ablate(batch=[1]), torch.zeros_like, batch=[1]
    ),
    "ablate_zero_neuron_mlp": _simple(
        "blocks.0.mlp.hook_post",
        hooks.ablate(neuron=[0, 5, 7]),
        torch.zeros_like,
        neuron=[0, 5, 7],
    ),
    "ablate_mean_batch_head": _simple(
        "blocks.0.attn.hook_z", hooks.ablate("mean", head=[3]), _mean(0), head=[3]
    ),
    "ablate_mean_pos": _simple(
        "blocks.1.hook_resid_pre", hooks.ablate("mean", mean_over="pos"), _mean(1)
    ),
    "ablate_mean_pos_pattern_head": _simple(
        "blocks.0.attn.hook_pattern",
        hooks.ablate("mean", mean_over="pos", head=[0]),
        _mean(2),
        head=[0],
    ),
    "ablate_resample": _simple(
        "blocks.0.hook_mlp_out", hooks.ablate("resample"), lambda x: x[[1, 0]]
    ),
    "ablate_resample_rows_pos": _simple(
        "blocks.0.hook_mlp_out",
        hooks.ablate("resample", source_batch=[0, 0], pos=[2]),
        lambda x: x[[0, 0]],
        pos=[2],
    ),
    "patch_cache_pos": _case_patch_cache("blocks.0.hook_resid_post", pos=[3]),
    "patch_cache_all": _case_patch_cache("blocks.1.hook_resid_pre"),
    "patch_cache_head_z": _case_patch_cache("blocks.1.attn.hook_z", head=[1]),
    "patch_tensor_full": _case_patch_tensor("blocks.0.hook_resid_post", False, pos=[0, 1]),
    "patch_tensor_selection": _case_patch_tensor(
        "blocks.0.hook_resid_post", True, pos=[4], batch=[1]
    ),
    "patch_tensor_head_z": _case_patch_tensor("blocks.0.attn.hook_z", True, head=[2]),
    "patch_row": _case_patch_row("blocks.0.hook_resid_post", 0, batch=[1], pos=[2, 3]),
    "patch_row_all": _case_patch_row("blocks.1.hook_resid_pre", 1),
    "steer": _case_steer("blocks.1.hook_resid_pre", 3.0),
    "steer_pos": _case_steer("blocks.0.hook_resid_post", -2.0, pos=[1]),
    "steer_glob": _case_steer("blocks.*.hook_resid_pre", 1.5, pos=[1, 4]),
    "steer_stored_ref": _case_steer("hook_embed", 0.7, stored=True),
    "steer_head_z": _case_steer("blocks.0.attn.hook_z", 2.0, head=[3]),
    "steer_selection_shaped": _case_steer_selection_shaped(
        "blocks.0.attn.hook_z", 0.5, head=[0], pos=[1]
    ),
    "scale_pattern_head": _simple(
        "blocks.1.attn.hook_pattern", hooks.scale(0.5, head=[1]), lambda x: x * 0.5, head=[1]
    ),
    "scale_glob": _case_glob_scale,
    "clamp_mlp_neurons": _simple(
        "blocks.0.mlp.hook_post",
        hooks.clamp(max=0.05, neuron=list(range(0, 32, 2))),
        lambda x: x.clamp(max=0.05),
        neuron=list(range(0, 32, 2)),
    ),
    "clamp_both": _simple(
        "blocks.0.hook_resid_post", hooks.clamp(-0.1, 0.2), lambda x: x.clamp(-0.1, 0.2)
    ),
    "set_scalar_pattern": _simple(
        "blocks.0.attn.hook_pattern",
        hooks.set(0.25, head=[2], pos=[3]),
        lambda x: torch.full_like(x, 0.25),
        head=[2],
        pos=[3],
    ),
    "set_scalar_neuron": _simple(
        "blocks.1.mlp.hook_post",
        hooks.set(1.5, neuron=3),
        lambda x: torch.full_like(x, 1.5),
        neuron=3,
    ),
    "set_tensor": _case_set_tensor("blocks.0.hook_resid_post", pos=[0]),
    "project_out": _case_project_out("blocks.0.hook_resid_post"),
    "project_out_glob_pos": _case_project_out("blocks.*.hook_resid_pre", pos=[2, 5]),
    "predicate_name": _case_predicate,
    "several_specs": _case_several,
    "gqa_hook_k_head": _case_gqa_k,
}


@pytest.mark.parametrize("case", list(CASES))
def test_hook_spec_matches_tl_hook_function(server: Served, case: str) -> None:
    tokens = sample_tokens(server.tl)
    ours, ref = CASES[case](server, tokens)
    expected = server.tl.run_with_hooks(tokens, fwd_hooks=ref)
    clean = server.tl(tokens)
    assert (expected - clean).abs().max() > 1e-4, "the reference edit changes nothing"
    actual = server.model.run_with_hooks(tokens, fwd_hooks=ours)
    assert_close(actual, expected, f"logits under {case}")


CONDITIONAL_POINTS = {
    "blocks.0.attn.hook_result": "set_use_attn_result",
    "blocks.1.hook_mlp_in": "set_use_hook_mlp_in",
    "blocks.0.hook_q_input": "set_use_split_qkv_input",
}


@pytest.mark.parametrize("name", list(CONDITIONAL_POINTS))
def test_exact_name_on_a_conditional_point_acts_as_with_tl_flag_on(
    gpt2_server: Served, name: str
) -> None:
    """hooklab has no ``set_use_*`` setters: hooking a conditional point by its exact name turns
    it on. (TL 3.9 with the flag off would silently never run the hook; with it on, the edit
    applies.) Reference: TL with the flag on."""
    served = gpt2_server
    tokens = sample_tokens(served.tl)
    setter = CONDITIONAL_POINTS[name]
    getattr(served.tl, setter)(True)
    try:
        expected = served.tl.run_with_hooks(
            tokens, fwd_hooks=[(name, edit(lambda x: x * 0.5, "", {}))]
        )
    finally:
        getattr(served.tl, setter)(False)
    actual = served.model.run_with_hooks(tokens, fwd_hooks=[(name, hooks.scale(0.5))])
    assert_close(actual, expected, "logits")


@pytest.mark.parametrize("form", ["predicate", "glob"])
def test_wide_name_pattern_hooks_only_points_that_fire(gpt2_server: Served, form: str) -> None:
    served = gpt2_server
    tokens = sample_tokens(served.tl)
    predicate = lambda n: n.startswith("blocks.0.")  # noqa: E731
    expected = served.tl.run_with_hooks(
        tokens, fwd_hooks=[(predicate, edit(lambda x: x * 0.9, "", {}))]
    )
    name: Any = predicate if form == "predicate" else "blocks.0.*"
    actual = served.model.run_with_hooks(tokens, fwd_hooks=[(name, hooks.scale(0.9))])
    assert_close(actual, expected, "logits")


def test_hooks_with_string_input_and_return_types(gpt2_server: Served) -> None:
    served = gpt2_server
    name = "blocks.0.hook_mlp_out"
    ref = [(name, edit(lambda x: x * -1.0, "bpd", {}))]
    for return_type in ("logits", "loss"):
        expected = served.tl.run_with_hooks(PROMPTS, fwd_hooks=ref, return_type=return_type)
        actual = served.model.run_with_hooks(
            PROMPTS, fwd_hooks=[(name, hooks.scale(-1.0))], return_type=return_type
        )
        assert_close(actual, expected, return_type)


# ---- run_with_cache ---------------------------------------------------------------------------


def test_run_with_cache_all_hooks(server: Served) -> None:
    tokens = sample_tokens(server.tl)
    ref_logits, ref_cache = server.tl.run_with_cache(tokens, return_cache_object=False)
    logits, cache = server.model.run_with_cache(tokens, return_cache_object=False)
    assert set(cache) == set(ref_cache)
    for name, value in ref_cache.items():
        assert_close(cache[name], value, name)
    assert_close(logits, ref_logits, "logits")


def test_run_with_cache_text_batch(gpt2_server: Served) -> None:
    ref_logits, ref_cache = gpt2_server.tl.run_with_cache(PROMPTS)
    logits, cache = gpt2_server.model.run_with_cache(PROMPTS)
    assert sorted(cache.keys()) == sorted(ref_cache.keys())
    for name in ref_cache:
        assert_close(cache[name], ref_cache[name], name)
    assert_close(logits, ref_logits, "logits")


NAMES_FILTERS: dict[str, Any] = {
    "str": "blocks.1.hook_resid_post",
    "list": ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"],
    "callable_pattern": lambda name: name.endswith("hook_pattern"),
    "callable_layer_1": lambda name: name.startswith("blocks.1."),
    "callable_scale": lambda name: "hook_scale" in name,
    "callable_none": lambda name: False,
}


@pytest.mark.parametrize("form", list(NAMES_FILTERS))
def test_names_filter_forms(server: Served, form: str) -> None:
    names_filter = NAMES_FILTERS[form]
    tokens = sample_tokens(server.tl)
    ref_logits, ref_cache = server.tl.run_with_cache(
        tokens, names_filter=names_filter, return_cache_object=False
    )
    logits, cache = server.model.run_with_cache(
        tokens, names_filter=names_filter, return_cache_object=False
    )
    assert set(cache) == set(ref_cache)
    for name, value in ref_cache.items():
        assert_close(cache[name], value, name)
    assert_close(logits, ref_logits, "logits")


def test_remove_batch_dim(server: Served) -> None:
    tokens = sample_tokens(server.tl, batch=1)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    _, ref_cache = server.tl.run_with_cache(
        tokens, names_filter=names, remove_batch_dim=True, return_cache_object=False
    )
    _, cache = server.model.run_with_cache(
        tokens, names_filter=names, remove_batch_dim=True, return_cache_object=False
    )
    assert set(cache) == set(ref_cache)
    for name in names:
        assert_close(cache[name], ref_cache[name], name)


def test_run_with_cache_under_hooks(server: Served) -> None:
    """The cache holds the edited activations, and downstream ones see the edit (as in TL)."""
    tokens = sample_tokens(server.tl)
    vector = _vector(server.tl.cfg.d_model, seed=21)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    ref_hooks = [
        ("blocks.0.hook_resid_post", edit(lambda x: x + 4.0 * vector, "bpd", {"pos": [2]})),
        ("blocks.1.attn.hook_z", edit(torch.zeros_like, "bphd", {"head": [0]})),
    ]
    with server.tl.hooks(fwd_hooks=ref_hooks):
        ref_logits, ref_cache = server.tl.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    logits, cache = server.model.run_with_cache(
        tokens,
        names_filter=names,
        return_cache_object=False,
        fwd_hooks=[
            ("blocks.0.hook_resid_post", hooks.steer(vector, 4.0, pos=[2])),
            ("blocks.1.attn.hook_z", hooks.ablate(head=[0])),
        ],
    )
    assert set(cache) == set(ref_cache)
    for name in names:
        assert_close(cache[name], ref_cache[name], name)
    assert_close(logits, ref_logits, "logits")


def test_cache_object_indexing(gpt2_server: Served) -> None:
    tokens = sample_tokens(gpt2_server.tl)
    _, ref_cache = gpt2_server.tl.run_with_cache(tokens)
    _, cache = gpt2_server.model.run_with_cache(tokens)
    assert_close(cache["resid_post", 1], ref_cache["resid_post", 1], "resid_post 1")
    assert_close(cache["pattern", 0], ref_cache["pattern", 0], "pattern 0")


# ---- forward: return types, layer ranges, padding ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"return_type": "logits"},
        {"return_type": "loss"},
        {"return_type": "loss", "loss_per_token": True},
        {"return_type": "both"},
        {"return_type": "both", "loss_per_token": True},
        {"return_type": None},
    ],
    ids=["default", "logits", "loss", "loss_per_token", "both", "both_per_token", "none"],
)
def test_forward_return_types(server: Served, kwargs: dict[str, Any]) -> None:
    tokens = sample_tokens(server.tl)
    expected = server.tl(tokens, **kwargs)
    actual = server.model(tokens, **kwargs)
    if kwargs.get("return_type", "logits") is None:
        assert actual is None and expected is None
    elif kwargs.get("return_type") == "both":
        logits, loss = actual
        assert_close(logits, expected[0], "logits")
        assert_close(loss, expected[1], "loss")
        assert_close(actual.logits, expected.logits, "logits attribute")
        assert_close(actual.loss, expected.loss, "loss attribute")
    else:
        assert_close(actual, expected, str(kwargs))


@pytest.mark.parametrize("stop", [0, 1, -1])
def test_stop_at_layer(server: Served, stop: int) -> None:
    tokens = sample_tokens(server.tl)
    assert_close(server.model(tokens, stop_at_layer=stop), server.tl(tokens, stop_at_layer=stop))


@pytest.mark.parametrize(("start", "stop"), [(1, None), (-1, None), (0, 1)])
def test_start_at_layer(server: Served, start: int, stop: int | None) -> None:
    tokens = sample_tokens(server.tl)
    layer = start % server.tl.cfg.n_layers
    _, ref_cache = server.tl.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_pre")
    residual = ref_cache[f"blocks.{layer}.hook_resid_pre"]
    expected = server.tl(residual, start_at_layer=start, stop_at_layer=stop)
    actual = server.model(residual, start_at_layer=start, stop_at_layer=stop)
    assert_close(actual, expected, f"start_at_layer={start} stop_at_layer={stop}")


def test_start_at_layer_with_tokens_for_the_loss(server: Served) -> None:
    tokens = sample_tokens(server.tl)
    _, ref_cache = server.tl.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    residual = ref_cache["blocks.1.hook_resid_pre"]
    expected = server.tl(residual, start_at_layer=1, tokens=tokens, return_type="loss")
    actual = server.model(residual, start_at_layer=1, tokens=tokens, return_type="loss")
    assert_close(actual, expected, "loss")


def _left_padded(tl: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = sample_tokens(tl, batch=2, pos=9, seed=3)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    tokens[1, :4] = tl.tokenizer.pad_token_id
    return tokens, mask


def test_left_padded_batch_with_attention_mask(server: Served) -> None:
    tokens, mask = _left_padded(server.tl)
    real = mask.bool()
    expected = server.tl(tokens, attention_mask=mask)
    actual = server.model(tokens, attention_mask=mask)
    assert_close(actual[real], expected[real], "logits at real positions")
    for kwargs in ({"return_type": "loss"}, {"return_type": "loss", "loss_per_token": True}):
        assert_close(
            server.model(tokens, attention_mask=mask, **kwargs),
            server.tl(tokens, attention_mask=mask, **kwargs),
            str(kwargs),
        )
    # hooks on a padded batch
    name = "blocks.0.hook_resid_post"
    expected = server.tl.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=[(name, edit(lambda x: x * 0.5, "bpd", {}))]
    )
    actual = server.model.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=[(name, hooks.scale(0.5))]
    )
    assert_close(actual[real], expected[real], "hooked logits at real positions")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_text_input_padding_and_bos(
    server: Served, padding_side: str, prepend_bos: bool | None
) -> None:
    texts = ["x = 1", "def main(argv): return parse(argv)"]
    tokens = server.tl.to_tokens(texts, prepend_bos=prepend_bos, padding_side=padding_side)
    pad = server.tl.tokenizer.pad_token_id
    expected = server.tl(texts, prepend_bos=prepend_bos, padding_side=padding_side)
    actual = server.model(texts, prepend_bos=prepend_bos, padding_side=padding_side)
    real = tokens != pad
    assert_close(actual[real], expected[real], "logits at real positions")
    loss = server.model(
        texts, prepend_bos=prepend_bos, padding_side=padding_side, return_type="loss"
    )
    ref_loss = server.tl(
        texts, prepend_bos=prepend_bos, padding_side=padding_side, return_type="loss"
    )
    assert_close(loss, ref_loss, "loss")


# ---- hooks held by the client -----------------------------------------------------------------


def test_hooks_context_manager(server: Served) -> None:
    tokens = sample_tokens(server.tl)
    name = "blocks.0.attn.hook_z"
    ref_fn = edit(torch.zeros_like, "bphd", {"head": [0, 2]})
    with server.tl.hooks(fwd_hooks=[(name, ref_fn)]):
        expected = server.tl(tokens)
        expected_cache_logits, _ = server.tl.run_with_cache(tokens, names_filter=name)
    with server.model.hooks(fwd_hooks=[(name, hooks.ablate(head=[0, 2]))]) as hooked:
        assert hooked is server.model
        assert_close(server.model(tokens), expected, "forward inside hooks()")
        logits, _ = server.model.run_with_cache(tokens, names_filter=name)
        assert_close(logits, expected_cache_logits, "run_with_cache inside hooks()")
    assert_close(server.model(tokens), server.tl(tokens), "forward after hooks()")
    # reset_hooks_end=False leaves them in place, as in TL
    try:
        with server.model.hooks(
            fwd_hooks=[(name, hooks.ablate(head=[0, 2]))], reset_hooks_end=False
        ):
            pass
        assert_close(server.model(tokens), expected, "forward after hooks(reset_hooks_end=False)")
    finally:
        server.model.reset_hooks()
    assert_close(server.model(tokens), server.tl(tokens), "forward after reset_hooks()")


def test_add_hook_and_reset_hooks(server: Served) -> None:
    tokens = sample_tokens(server.tl)
    predicate = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    try:
        server.model.add_hook(predicate, hooks.scale(0.9))
        server.model.add_hook("blocks.0.mlp.hook_post", hooks.ablate(neuron=[1, 2]))
        server.tl.add_hook(predicate, edit(lambda x: x * 0.9, "bpd", {}))
        server.tl.add_hook(
            "blocks.0.mlp.hook_post", edit(torch.zeros_like, "bpd", {"neuron": [1, 2]})
        )
        expected = server.tl(tokens)
        assert_close(server.model(tokens), expected, "forward with added hooks")
        # fwd_hooks passed to a call run after the added ones, as in TL
        extra = [("blocks.1.hook_resid_pre", hooks.set(1.0, pos=[0]))]
        ref_set = [("blocks.1.hook_resid_pre", edit(torch.ones_like, "bpd", {"pos": [0]}))]
        assert_close(
            server.model.run_with_hooks(tokens, fwd_hooks=extra),
            server.tl.run_with_hooks(tokens, fwd_hooks=ref_set),
            "run_with_hooks on top of added hooks",
        )
    finally:
        server.model.reset_hooks()
        server.tl.reset_hooks()
    assert_close(server.model(tokens), server.tl(tokens), "forward after reset_hooks")


def test_a_hook_that_is_neither_a_function_nor_a_spec_is_a_type_error(gpt2_server: Served) -> None:
    tokens = sample_tokens(gpt2_server.tl)
    with pytest.raises(TypeError, match=r"fn\(activation, hook\) or a hooklab\.hooks spec"):
        gpt2_server.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", 3.0)])
    with pytest.raises(TypeError, match=r"hooklab\.hooks spec"):
        gpt2_server.model.add_hook("blocks.0.hook_resid_post", "zero")


def test_config_and_hook_names_match_tl(server: Served) -> None:
    cfg, ref = server.model.cfg, server.tl.cfg
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
                  "act_fn", "normalization_type", "positional_embedding_type"):  # fmt: skip
        assert getattr(cfg, field) == getattr(ref, field), field
    assert sorted(server.model.hook_names) == sorted(server.tl.hook_dict)


def test_one_dimensional_token_input(server: Served) -> None:
    tokens = sample_tokens(server.tl, batch=1)[0]
    assert_close(server.model(tokens), server.tl(tokens), "logits")
    assert_close(
        server.model(tokens, return_type="loss"), server.tl(tokens, return_type="loss"), "loss"
    )


# ---- weights ----------------------------------------------------------------------------------

WEIGHTS = [
    "W_E",
    "W_U",
    "b_U",
    "W_pos",
    "W_Q",
    "W_K",
    "W_V",
    "W_O",
    "b_Q",
    "b_K",
    "b_V",
    "b_O",
    "W_in",
    "W_out",
    "W_gate",
    "b_in",
    "b_out",
]


def test_weights_match_tl(server: Served) -> None:
    for name in WEIGHTS:
        try:
            expected = getattr(server.tl, name)
        except AttributeError:
            expected = None
        actual = getattr(server.model, name)
        if expected is None:
            assert actual is None, name
            continue
        assert_close(actual, expected, name)
    if server.tl.cfg.positional_embedding_type == "standard":
        assert_close(server.model.W_E_pos, server.tl.W_E_pos, "W_E_pos")
    for layer, mlp_input in ((0, False), (1, True), (2, False)):
        assert_close(
            server.model.accumulated_bias(layer, mlp_input=mlp_input),
            server.tl.accumulated_bias(layer, mlp_input=mlp_input),
            f"accumulated_bias({layer}, {mlp_input})",
        )
    tokens = torch.tensor([5, 17, 42])
    assert_close(
        server.model.tokens_to_residual_directions(tokens),
        server.tl.tokens_to_residual_directions(tokens),
        "tokens_to_residual_directions",
    )
    assert_close(server.model.QK.AB, server.tl.QK.AB, "QK.AB")
    assert_close(server.model.OV.AB, server.tl.OV.AB, "OV.AB")


# ---- tokenizer helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_tokenizer_helpers(server: Served, prepend_bos: bool | None) -> None:
    model, tl = server.model, server.tl
    text = "def parse(self, args=None):"
    assert torch.equal(
        model.to_tokens(text, prepend_bos=prepend_bos), tl.to_tokens(text, prepend_bos=prepend_bos)
    )
    for side in ("left", "right"):
        assert torch.equal(
            model.to_tokens(PROMPTS, prepend_bos=prepend_bos, padding_side=side),
            tl.to_tokens(PROMPTS, prepend_bos=prepend_bos, padding_side=side),
        ), side
    assert model.to_str_tokens(text, prepend_bos=prepend_bos) == tl.to_str_tokens(
        text, prepend_bos=prepend_bos
    )
    tokens = tl.to_tokens(text)
    assert model.to_str_tokens(tokens) == tl.to_str_tokens(tokens)
    assert model.to_str_tokens(tokens[0]) == tl.to_str_tokens(tokens[0])
    assert model.to_string(tokens[0]) == tl.to_string(tokens[0])
    assert model.to_string(tl.to_tokens(PROMPTS)) == tl.to_string(tl.to_tokens(PROMPTS))
    assert model.to_str_tokens(PROMPTS, prepend_bos=prepend_bos) == tl.to_str_tokens(
        PROMPTS, prepend_bos=prepend_bos
    )
    token = int(tokens[0, 3])
    for mode in ("first", "last"):
        assert model.get_token_position(token, text, mode=mode) == tl.get_token_position(
            token, text, mode=mode
        )
    for word in ("def", " return", "self"):
        try:
            expected: Any = tl.to_single_token(word)
        except AssertionError:
            expected = None
        if expected is None:
            with pytest.raises(ValueError):
                model.to_single_token(word)
        else:
            assert model.to_single_token(word) == expected


def test_patch_from_a_single_prompt_cache_into_a_batch(server: Served) -> None:
    """The usual patching set-up: one clean prompt's cache patched into every corrupted row."""
    name = "blocks.1.hook_resid_pre"
    clean = sample_tokens(server.tl, batch=1, seed=4)
    corrupted = sample_tokens(server.tl, batch=3, seed=5)
    _, stored = server.model.run_with_cache(clean, names_filter=name, store=True)
    _, ref_cache = server.tl.run_with_cache(clean, names_filter=name)
    source = ref_cache[name]
    expected = server.tl.run_with_hooks(
        corrupted, fwd_hooks=[(name, edit(lambda x: source.expand_as(x), "bpd", {"pos": [-2]}))]
    )
    actual = server.model.run_with_hooks(
        corrupted, fwd_hooks=[(name, hooks.patch(stored.cache_id, pos=[-2]))]
    )
    assert_close(actual, expected, "logits")
    server.model.delete_stored(stored.cache_id)


def test_caching_an_exact_conditional_name_acts_as_with_tl_flag_on(gpt2_server: Served) -> None:
    served = gpt2_server
    tokens = sample_tokens(served.tl)
    names = ["blocks.0.attn.hook_result", "blocks.1.hook_mlp_in", "blocks.1.hook_resid_post"]
    served.tl.set_use_attn_result(True)
    served.tl.set_use_hook_mlp_in(True)
    try:
        _, ref_cache = served.tl.run_with_cache(tokens, names_filter=names)
    finally:
        served.tl.set_use_attn_result(False)
        served.tl.set_use_hook_mlp_in(False)
    _, cache = served.model.run_with_cache(tokens, names_filter=names, return_cache_object=False)
    assert set(cache) == set(names)
    for name in names:
        assert_close(cache[name], ref_cache[name], name)
