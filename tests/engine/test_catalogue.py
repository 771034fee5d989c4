"""The hook catalogue (names, firing order, shapes, default firing, short names) equals
TransformerLens 3.9's on the same checkpoints.

TL's ``hook_dict`` gives its names, the key order of its ``run_with_cache`` dict its firing order,
its activations the real shapes, and ``utils.get_act_name`` the short names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_helpers import is_gqa, our_model, sample_tokens, tl_flag, tl_model
from transformer_lens.utilities import get_act_name

from hooklab_proto import PATCH_ACTIVATIONS
from hooklab_server.engine.catalogue import (
    HOOK_POINTS,
    act_names,
    axis_sizes,
    fires_by_default,
    hook_names,
    hook_shape,
    module_hooks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The config flags of the conditional hook points; TL's setter is "set_" + flag.
FLAGS = sorted({point.flag for point in HOOK_POINTS if point.flag is not None})


def _tl_cache(checkpoint: Path, flag: str | None = None) -> dict[str, torch.Tensor]:
    """TL's run_with_cache of every hook point, with one conditional flag on (or none)."""
    model, tokens = tl_model(checkpoint), sample_tokens(checkpoint)
    if flag is None:
        return model.run_with_cache(tokens, return_cache_object=False)[1]
    with tl_flag(model, f"set_{flag}"):
        return model.run_with_cache(tokens, return_cache_object=False)[1]


def _skip_unsupported(checkpoint: Path, flag: str | None) -> None:
    if flag == "use_attn_in" and is_gqa(checkpoint):
        pytest.skip("TL's set_use_attn_in asserts multi-head attention (no GQA)")


def test_hook_names_are_tl_hook_dict(any_checkpoint: Path) -> None:
    names = hook_names(our_model(any_checkpoint).cfg)
    assert len(names) == len(set(names)), "duplicate hook names"
    assert sorted(names) == sorted(tl_model(any_checkpoint).hook_dict)


@pytest.mark.parametrize("flag", [None, *FLAGS])
def test_firing_and_order_match_tl(any_checkpoint: Path, flag: str | None) -> None:
    """With TL's default flags, or one conditional flag on, the points that fire by default are
    exactly those TL's run_with_cache fires, and ``hook_names`` lists them in TL's firing order."""
    _skip_unsupported(any_checkpoint, flag)
    cfg = our_model(any_checkpoint).cfg
    if flag is not None:
        cfg = dataclasses.replace(cfg, **{flag: True})
    firing = [name for name in hook_names(cfg) if fires_by_default(name, cfg)]
    assert firing == list(_tl_cache(any_checkpoint, flag))


@pytest.mark.parametrize("flag", [None, *FLAGS])
def test_hook_shapes_resolve_to_tl_shapes(any_checkpoint: Path, flag: str | None) -> None:
    """Each hook point's symbolic shape, sized for the run, is TL's activation shape.

    With a flag on only its conditional points are checked: TL then normalises per head, so the
    ln1 hooks carry a head axis that the catalogue (describing the default forward) leaves out.
    """
    _skip_unsupported(any_checkpoint, flag)
    cfg = our_model(any_checkpoint).cfg
    batch, pos = sample_tokens(any_checkpoint).shape
    sizes = axis_sizes(cfg, batch, pos)
    cache = _tl_cache(any_checkpoint, flag)
    if flag is not None:
        conditional = {point.name for point in HOOK_POINTS if point.flag == flag}
        cache = {name: cache[name] for name in cache if _declared_name(name) in conditional}
        assert cache, f"TL fired no {flag} point"
    for name, activation in cache.items():
        axes = hook_shape(name, cfg)
        expected = tuple(activation.shape)
        assert tuple(sizes[axis] for axis in axes) == expected, f"{name}: {axes} vs {expected}"


def _declared_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        parts[1] = "{layer}"
    return ".".join(parts)


def test_act_names_are_tl_get_act_name(any_checkpoint: Path) -> None:
    """Every short name maps to ``get_act_name(short, layer)``, a TL hook point, in every layer;
    and every per-block TL point whose own short name round-trips is covered."""
    cfg = our_model(any_checkpoint).cfg
    templates = act_names(cfg)
    hook_dict = tl_model(any_checkpoint).hook_dict
    for short, template in templates.items():
        for layer in range(cfg.n_layers):
            name = template.format(layer=layer)
            assert name == get_act_name(short, layer), short
            assert name in hook_dict, name
    for name in hook_dict:
        if not name.startswith("blocks."):
            continue
        short = name.rsplit(".", 1)[1].removeprefix("hook_")
        if get_act_name(short, int(name.split(".")[1])) == name:
            assert templates.get(short) == _declared_name(name), short


def test_module_hooks_name_tl_hook_points(any_checkpoint: Path) -> None:
    """The components' names (module path + hook) are TL's HookPoint module paths."""
    model = tl_model(any_checkpoint)
    for name in model.hook_dict:
        module, _, hook = name.rpartition(".")
        assert module_hooks(module)[hook.removeprefix("hook_")] == name


def test_the_wire_vocabulary_of_patchable_activations_is_the_catalogues() -> None:
    """proto's PATCH_ACTIVATIONS (what clients may name) lists exactly the short names the
    hook catalogue declares, with the same hook templates."""
    declared = {spec.act: spec.name for spec in HOOK_POINTS if spec.act is not None}
    assert declared == PATCH_ACTIVATIONS
