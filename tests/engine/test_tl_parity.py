"""The engine's activations, logits and losses equal TransformerLens 3.9's on the same weights.

Each fixture architecture (GPT-2, Llama with GQA, GPT-NeoX with parallel attn+MLP and partial
rotary) is loaded with the default weight processing and with none (TL's
``from_pretrained_no_processing``); TransformerLens gets the same flags (``fixtures.oracle``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import (
    as_dict,
    assert_caches_close,
    assert_close,
    assert_same_keys,
    is_gqa,
    left_padded_batch,
    our_model,
    sample_tokens,
    tl_flag,
    tl_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["processed", "unprocessed"])
def processing(request: pytest.FixtureRequest) -> str:
    return request.param


# ---- full forward and cache ------------------------------------------------------------------


def test_config_matches_tl(any_checkpoint: Path, processing: str) -> None:
    cfg, ref = our_model(any_checkpoint, processing).cfg, tl_model(any_checkpoint, processing).cfg
    fields = (
        "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
        "positional_embedding_type", "default_prepend_bos",
    )  # fmt: skip
    for field in fields:
        assert getattr(cfg, field) == getattr(ref, field), field
    assert (cfg.n_key_value_heads or cfg.n_heads) == (ref.n_key_value_heads or ref.n_heads)
    if ref.positional_embedding_type == "rotary":
        assert cfg.rotary_dim == ref.rotary_dim
    # Folded norms have no weights of their own: LN -> LNPre, RMS -> RMSPre, as in TL.
    assert cfg.normalization_type == ref.normalization_type


def test_hook_names_match_tl_hook_dict(any_checkpoint: Path, processing: str) -> None:
    """``hook_names`` lists every hook point TL has, conditional ones included."""
    names = our_model(any_checkpoint, processing).hook_names
    assert len(names) == len(set(names)), "duplicate hook names"
    assert_same_keys(dict.fromkeys(names), tl_model(any_checkpoint, processing).hook_dict, "hooks")


def test_run_with_cache_matches_tl(any_checkpoint: Path, processing: str) -> None:
    """All hooks: same keys (TL 3.9 has unembed.hook_in/out), shapes and values; same logits."""
    tokens = sample_tokens(any_checkpoint)
    ref_logits, ref_cache = tl_model(any_checkpoint, processing).run_with_cache(
        tokens, return_cache_object=False
    )
    logits, cache = our_model(any_checkpoint, processing).run_with_cache(tokens)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")


def test_plain_forward_logits_match_tl(any_checkpoint: Path, processing: str) -> None:
    """Without hooks the logits still equal TL's."""
    tokens = sample_tokens(any_checkpoint)
    ref = tl_model(any_checkpoint, processing)(tokens)
    assert_close(our_model(any_checkpoint, processing)(tokens), ref, "logits")
    assert_close(our_model(any_checkpoint, processing)(tokens, return_type="logits"), ref, "logits")


def test_losses_match_tl(any_checkpoint: Path, processing: str) -> None:
    tokens = sample_tokens(any_checkpoint)
    ours, ref = our_model(any_checkpoint, processing), tl_model(any_checkpoint, processing)

    loss = ours(tokens, return_type="loss")
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert_close(loss, ref(tokens, return_type="loss"), "loss")

    assert_close(
        ours(tokens, return_type="loss", loss_per_token=True),
        ref(tokens, return_type="loss", loss_per_token=True),
        "per-token loss [batch, pos - 1]",
    )

    logits, both_loss = ours(tokens, return_type="both")
    ref_logits, ref_loss = ref(tokens, return_type="both")
    assert_close(logits, ref_logits, "logits of return_type='both'")
    assert_close(both_loss, ref_loss, "loss of return_type='both'")

    assert ours(tokens, return_type=None) is None


# ---- conditional hooks -------------------------------------------------------------------------

# flag → (TL setter, hook names per layer)
CONDITIONAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "attn_result": ("set_use_attn_result", ("blocks.{L}.attn.hook_result",)),
    "split_qkv_input": (
        "set_use_split_qkv_input",
        ("blocks.{L}.hook_q_input", "blocks.{L}.hook_k_input", "blocks.{L}.hook_v_input"),
    ),
    "hook_mlp_in": ("set_use_hook_mlp_in", ("blocks.{L}.hook_mlp_in",)),
    "attn_in": ("set_use_attn_in", ("blocks.{L}.hook_attn_in",)),
}


def _conditional_names(flag: str, n_layers: int) -> list[str]:
    return [t.format(L=layer) for layer in range(n_layers) for t in CONDITIONAL[flag][1]]


@pytest.mark.parametrize("flag", list(CONDITIONAL))
def test_conditional_hooks_match_tl_with_flag_on(
    any_checkpoint: Path, processing: str, flag: str
) -> None:
    """Named in ``names_filter`` (exact list) or hooked, a conditional hook fires as in TL."""
    if flag == "attn_in" and is_gqa(any_checkpoint):
        pytest.skip("TL's set_use_attn_in asserts multi-head attention (no GQA)")
    tokens = sample_tokens(any_checkpoint)
    ours, ref_model = our_model(any_checkpoint, processing), tl_model(any_checkpoint, processing)
    names = _conditional_names(flag, ref_model.cfg.n_layers)
    with tl_flag(ref_model, CONDITIONAL[flag][0]):
        ref_logits, ref_cache = ref_model.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    assert_same_keys(ref_cache, dict.fromkeys(names), "TL cache")  # the oracle fired them

    logits, cache = ours.run_with_cache(tokens, names_filter=names)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")

    # Hooked (not cached): the hook function sees the same tensors.
    seen: dict[str, torch.Tensor] = {}

    def capture(activation: torch.Tensor, hook: object) -> None:
        seen[hook.name] = activation.detach().clone()  # type: ignore[attr-defined]

    logits = ours.run_with_hooks(tokens, fwd_hooks=[(name, capture) for name in names])
    assert_same_keys(seen, ref_cache, "hooked conditional points")
    assert_caches_close(seen, ref_cache)
    assert_close(logits, ref_logits, "logits")


def test_conditional_hooks_mixed_with_regular_names(any_checkpoint: Path) -> None:
    tokens = sample_tokens(any_checkpoint)
    ref_model = tl_model(any_checkpoint)
    names = ["blocks.0.attn.hook_result", "blocks.1.hook_mlp_in", "blocks.0.hook_resid_pre"]
    with tl_flag(ref_model, "set_use_attn_result"), tl_flag(ref_model, "set_use_hook_mlp_in"):
        _, ref_cache = ref_model.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    _, cache = our_model(any_checkpoint).run_with_cache(tokens, names_filter=names)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)


# ---- padding, layer ranges ---------------------------------------------------------------------


def test_left_padded_batch_with_attention_mask(any_checkpoint: Path, processing: str) -> None:
    """Left padding + explicit mask: real positions equal TL's (masked scores -inf as in TL)."""
    tokens, mask, _ = left_padded_batch(any_checkpoint)
    ours, ref = our_model(any_checkpoint, processing), tl_model(any_checkpoint, processing)
    ref_logits, ref_cache = ref.run_with_cache(
        tokens, attention_mask=mask, return_cache_object=False
    )
    logits, cache = ours.run_with_cache(tokens, attention_mask=mask)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache, attention_mask=mask)
    assert_caches_close({"logits": logits}, {"logits": ref_logits}, attention_mask=mask)

    # Without hooks too.
    plain = ours(tokens, attention_mask=mask)
    assert_caches_close({"logits": plain}, {"logits": ref_logits}, attention_mask=mask)

    # The loss skips pairs that touch a pad, as TL's does.
    assert_close(
        ours(tokens, attention_mask=mask, return_type="loss"),
        ref(tokens, attention_mask=mask, return_type="loss"),
        "masked loss",
    )
    assert_close(
        ours(tokens, attention_mask=mask, return_type="loss", loss_per_token=True),
        ref(tokens, attention_mask=mask, return_type="loss", loss_per_token=True),
        "masked per-token loss",
    )


@pytest.mark.parametrize("stop", [0, 1, -1])
def test_stop_at_layer_matches_tl(any_checkpoint: Path, processing: str, stop: int) -> None:
    tokens = sample_tokens(any_checkpoint)
    ours, ref = our_model(any_checkpoint, processing), tl_model(any_checkpoint, processing)
    assert_close(
        ours(tokens, stop_at_layer=stop), ref(tokens, stop_at_layer=stop), f"stop_at_layer={stop}"
    )


@pytest.mark.parametrize(("start", "stop"), [(1, None), (-1, None), (0, 1), (1, 2)])
def test_start_at_layer_matches_tl(
    any_checkpoint: Path, processing: str, start: int, stop: int | None
) -> None:
    """The input is a residual stream; TL's own ``resid_pre`` of that layer is fed to both."""
    tokens = sample_tokens(any_checkpoint)
    ours, ref = our_model(any_checkpoint, processing), tl_model(any_checkpoint, processing)
    layer = start % ref.cfg.n_layers
    _, ref_cache = ref.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_pre")
    residual = ref_cache[f"blocks.{layer}.hook_resid_pre"]
    expected = ref(residual, start_at_layer=start, stop_at_layer=stop)
    actual = ours(residual.clone(), start_at_layer=start, stop_at_layer=stop)
    assert_close(actual, expected, f"start_at_layer={start}, stop_at_layer={stop}")


def test_run_with_cache_start_at_layer_matches_tl(any_checkpoint: Path) -> None:
    """Caching from a middle layer: keys and values of the layers that run."""
    tokens = sample_tokens(any_checkpoint)
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    _, full = ref.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    residual = full["blocks.1.hook_resid_pre"]
    ref_logits, ref_cache = ref.run_with_cache(
        residual, start_at_layer=1, return_cache_object=False
    )
    logits, cache = ours.run_with_cache(residual.clone(), start_at_layer=1)
    cache = as_dict(cache)
    assert_same_keys(cache, ref_cache)
    assert_caches_close(cache, ref_cache)
    assert_close(logits, ref_logits, "logits")


def test_layer_ranges_with_left_padding_match_tl(any_checkpoint: Path) -> None:
    """start/stop_at_layer on a left-padded batch with its mask; the loss from ``tokens=``."""
    tokens, mask, _ = left_padded_batch(any_checkpoint)
    ours, ref = our_model(any_checkpoint), tl_model(any_checkpoint)
    stopped = ref(tokens, stop_at_layer=1, attention_mask=mask)
    assert_caches_close(
        {"resid": ours(tokens, stop_at_layer=1, attention_mask=mask)},
        {"resid": stopped},
        attention_mask=mask,
    )
    residual = stopped.detach()
    assert_caches_close(
        {"logits": ours(residual.clone(), start_at_layer=1, attention_mask=mask)},
        {"logits": ref(residual, start_at_layer=1, attention_mask=mask)},
        attention_mask=mask,
    )
    assert_close(
        ours(residual.clone(), start_at_layer=1, attention_mask=mask, tokens=tokens,
             return_type="loss"),
        ref(residual, start_at_layer=1, attention_mask=mask, tokens=tokens, return_type="loss"),
        "loss from start_at_layer=1 with tokens=",
    )  # fmt: skip
