"""The SAE kinds SAELens users load beyond standard/jumprelu/topk (issue 17): gated SAEs, the
run-time normalisations (``normalize_activations``), topk's decoder-norm rescale, and SAEs on
per-head points (``attn.hook_z``, flattened as SAELens flattens them).

The oracle is SAELens 6.54: its ``SAE.load_from_disk`` on the same folder, run standalone with
``run_with_cache`` (its own hook points), and its ``HookedSAETransformer`` with the SAE attached
(error term on) on a TransformerLens model of the same weights.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures import saes
from hooklab_server.engine import load_model
from hooklab_server.engine.catalogue import axis_sizes, hook_shape
from hooklab_server.engine.saes import SaeLoadError, attach_sae, load_sae

sae_lens = pytest.importorskip("sae_lens")

RESID = "blocks.0.hook_resid_post"
Z = "blocks.1.attn.hook_z"
D_SAE = 40
PROMPT = "The cat sat on the mat"
write_sae = functools.partial(saes.write_sae, d_sae=D_SAE)
FEATURE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
POINTS = (*FEATURE_POINTS, "hook_sae_error", "hook_sae_output")


def saelens_sae(folder: Path) -> Any:
    return sae_lens.SAE.load_from_disk(str(folder), device="cpu").eval()


KINDS = [
    ("gated", "none", {}),
    ("gated", "layer_norm", {}),
    ("standard", "constant_norm_rescale", {}),
    ("standard", "layer_norm", {}),
    ("jumprelu", "constant_norm_rescale", {}),
    ("topk", "layer_norm", {"k": 6}),
    ("topk", "none", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    # Applied by neither at inference: SAELens's trainer folds them into the saved weights.
    ("standard", "expected_average_only_in", {}),
    ("jumprelu", "covariance_whitening", {}),
]


@pytest.mark.parametrize(("architecture", "normalize", "extra"), KINDS)
def test_kind_points_equal_saelens(
    gpt2_checkpoint: Path, tmp_path: Path, architecture: str, normalize: str, extra: dict[str, Any]
) -> None:
    """Every SAE point equals SAELens's own hook point of the same name, run standalone on the
    host activation; the error term is the host minus SAELens's forward, and the forward is
    unchanged."""
    model = load_model(str(gpt2_checkpoint))
    plain_logits, plain = model.run_with_cache(PROMPT, names_filter=[RESID])
    folder = write_sae(tmp_path / "sae", model.cfg.d_model, RESID, architecture, normalize, **extra)
    attach_sae(model, RESID, load_sae(folder))
    logits, cache = model.run_with_cache(PROMPT)
    assert torch.equal(logits, plain_logits)
    x = plain[RESID]
    theirs = saelens_sae(folder)
    with torch.no_grad():
        sae_out, expected = theirs.run_with_cache(x)
    for point in FEATURE_POINTS:
        torch.testing.assert_close(cache[f"{RESID}.{point}"], expected[point], msg=point)
    torch.testing.assert_close(cache[f"{RESID}.hook_sae_error"], x - sae_out)
    assert torch.equal(cache[f"{RESID}.hook_sae_output"], x)
    with torch.no_grad():
        acts = theirs.encode(x)
        torch.testing.assert_close(cache[f"{RESID}.hook_sae_acts_post"], acts)
    assert (acts != 0).any() and (acts == 0).any()  # the activation did select


def test_editing_a_normalised_sae_equals_saelens_decode(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """An edited feature goes through SAELens's decode, norm undone with the input's own
    statistics, plus the clean error term."""
    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(tmp_path / "sae", model.cfg.d_model, RESID, "gated", "layer_norm")
    attach_sae(model, RESID, load_sae(folder))
    names = [RESID, f"{RESID}.hook_sae_acts_post", f"{RESID}.hook_sae_output"]
    _, clean = model.run_with_cache(PROMPT, names_filter=names)
    feature = int(clean[f"{RESID}.hook_sae_acts_post"][0].sum(0).argmax())

    def ablate(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        value[..., feature] = 0
        return value

    _, edited = model.run_with_cache(
        PROMPT, fwd_hooks=[(f"{RESID}.hook_sae_acts_post", ablate)], names_filter=names
    )
    x = edited[RESID]
    theirs = saelens_sae(folder)
    with torch.no_grad():
        acts = theirs.encode(x)
        acts[..., feature] = 0
        expected = theirs.decode(acts) + (x - theirs(x))
    torch.testing.assert_close(edited[f"{RESID}.hook_sae_output"], expected)
    assert not torch.allclose(edited[f"{RESID}.hook_sae_output"], x)


def test_norm_scaling_factor_is_folded_as_from_pretrained(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """An expected_average_only_in SAE with its factor reads as SAELens's from_pretrained folds a
    release's norm_scaling_factor."""
    factor = 3.5
    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(
        tmp_path / "sae", model.cfg.d_model, RESID, "jumprelu", "expected_average_only_in",
        norm_scaling_factor=factor,
    )  # fmt: skip
    attach_sae(model, RESID, load_sae(folder))
    _, cache = model.run_with_cache(PROMPT, names_filter=[RESID, *(f"{RESID}.{p}" for p in POINTS)])
    theirs = saelens_sae(folder)
    theirs.fold_activation_norm_scaling_factor(factor)
    x = cache[RESID]
    with torch.no_grad():
        acts = theirs.encode(x)
        torch.testing.assert_close(cache[f"{RESID}.hook_sae_acts_post"], acts)
        torch.testing.assert_close(cache[f"{RESID}.hook_sae_recons"], theirs.decode(acts))


def test_a_gated_folder_saelens_saved_is_served(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    theirs = saelens_sae(write_sae(tmp_path / "ours", 64, RESID, "gated", "constant_norm_rescale"))
    saved = tmp_path / "saved"
    theirs.save_model(str(saved))
    assert "b_enc" not in json.loads((saved / "cfg.json").read_text())  # a config, not weights
    model = load_model(str(gpt2_checkpoint))
    attach_sae(model, RESID, load_sae(saved))
    _, cache = model.run_with_cache(PROMPT, names_filter=[RESID, f"{RESID}.hook_sae_recons"])
    with torch.no_grad():
        expected = theirs.decode(theirs.encode(cache[RESID]))
    # decode undoes the norm; hook_sae_recons is before that, as in SAELens
    assert not torch.allclose(cache[f"{RESID}.hook_sae_recons"], expected)
    _, cache = model.run_with_cache(
        PROMPT,
        fwd_hooks=[(f"{RESID}.hook_sae_error", lambda value, hook: torch.zeros_like(value))],
        names_filter=[f"{RESID}.hook_sae_output"],
    )
    torch.testing.assert_close(cache[f"{RESID}.hook_sae_output"], expected)


def hooked_sae_transformer(checkpoint: Path) -> Any:
    """SAELens's HookedSAETransformer with the weights of the TransformerLens oracle model."""
    from fixtures.oracle import load_tl_model

    tl = load_tl_model(checkpoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = sae_lens.HookedSAETransformer(tl.cfg, tokenizer=tl.tokenizer, move_to_device=False)
    model.load_state_dict(tl.state_dict())
    return model.eval()


@pytest.mark.parametrize(
    ("architecture", "normalize"), [("standard", "none"), ("gated", "layer_norm")]
)
def test_hook_z_sae_equals_hooked_sae_transformer(
    gpt2_checkpoint: Path, tmp_path: Path, architecture: str, normalize: str
) -> None:
    """A hook_z SAE (d_in = n_heads * d_head) sees the heads flattened and passes them back
    shaped per head: every point, the logits, and a feature edit equal HookedSAETransformer's
    with the SAE attached and the error term on."""
    model = load_model(str(gpt2_checkpoint))
    cfg = model.cfg
    plain_logits = model(PROMPT)
    folder = write_sae(tmp_path / "sae", cfg.n_heads * cfg.d_head, Z, architecture, normalize)
    attach_sae(model, Z, load_sae(folder))
    names = [Z, *(f"{Z}.{point}" for point in POINTS)]
    assert model.hook_names[model.hook_names.index(Z) : model.hook_names.index(Z) + 7] == names
    logits, cache = model.run_with_cache(PROMPT, names_filter=names)
    assert torch.equal(logits, plain_logits)

    sae = saelens_sae(folder)
    theirs = hooked_sae_transformer(gpt2_checkpoint)
    their_logits, their_cache = theirs.run_with_cache_with_saes(
        PROMPT, saes=[sae], use_error_term=True
    )
    torch.testing.assert_close(logits, their_logits, rtol=1e-4, atol=1e-4)
    sizes = axis_sizes(cfg, *cache[Z].shape[:2])
    # The SAE's wrapper takes the host's place there, so the host is its input, per head.
    their_z = their_cache[f"{Z}.hook_sae_input"].reshape(cache[Z].shape)
    torch.testing.assert_close(cache[Z], their_z, rtol=1e-4, atol=1e-4)
    for name in names:
        if name != Z:
            torch.testing.assert_close(
                cache[name], their_cache[name], rtol=1e-4, atol=1e-4, msg=name
            )
        shape = tuple(sizes[axis] for axis in hook_shape(name, cfg))
        assert shape == tuple(cache[name].shape), name
    assert hook_shape(f"{Z}.hook_sae_input", cfg) == ("batch", "pos", "q_width")
    assert hook_shape(f"{Z}.hook_sae_acts_post", cfg) == ("batch", "pos", f"d_sae[{Z}]")
    assert hook_shape(f"{Z}.hook_sae_output", cfg) == hook_shape(Z, cfg)

    feature = int(cache[f"{Z}.hook_sae_acts_post"][0].sum(0).argmax())

    def ablate(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        value[..., feature] = 0
        return value

    edit = [(f"{Z}.hook_sae_acts_post", ablate)]
    ours = model.run_with_hooks(PROMPT, fwd_hooks=edit)
    with theirs.saes(saes=[sae], use_error_term=True):
        expected = theirs.run_with_hooks(PROMPT, fwd_hooks=edit)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, plain_logits, rtol=1e-4, atol=1e-4)


def test_feature_steer_at_hook_z_adds_the_row_shaped_per_head(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """Steering adds coeff * W_dec[f] at hook_z, the row laid out [head, d_head] as SAELens
    reshapes its reconstruction, equal to adding it there in TransformerLens."""
    from fixtures.oracle import load_tl_model
    from hooklab_proto import FeatureSteerSpec
    from hooklab_server.ops.specs import _feature_edit

    model = load_model(str(gpt2_checkpoint))
    cfg = model.cfg
    sae = load_sae(write_sae(tmp_path / "sae", cfg.n_heads * cfg.d_head, Z))
    attach_sae(model, Z, sae)
    feature, coeff = 3, 2.5
    spec = FeatureSteerSpec(hook=Z, feature=feature, coeff=coeff)
    tokens = model.to_tokens(PROMPT)
    name, _, edit = _feature_edit(spec, model, *tokens.shape)
    assert name == Z
    ours = model.run_with_hooks(tokens, fwd_hooks=[(name, edit)])
    row = (coeff * sae.W_dec[feature]).reshape(cfg.n_heads, cfg.d_head)
    tl = load_tl_model(gpt2_checkpoint)
    theirs = tl.run_with_hooks(tokens, fwd_hooks=[(Z, lambda value, hook: value + row)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_unservable_kinds_are_refused(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(str(gpt2_checkpoint))
    d_model, heads = model.cfg.d_model, model.cfg.n_heads * model.cfg.d_head
    temporal = write_sae(tmp_path / "a", d_model, RESID, normalize="constant_scalar_rescale")
    with pytest.raises(SaeLoadError, match="normalize_activations 'constant_scalar_rescale'"):
        load_sae(temporal)
    scaled = write_sae(tmp_path / "b", d_model, RESID, norm_scaling_factor=2.0)
    with pytest.raises(SaeLoadError, match="norm_scaling_factor goes with"):
        load_sae(scaled)
    rescaled = write_sae(tmp_path / "c", d_model, RESID, rescale_acts_by_decoder_norm=True)
    with pytest.raises(SaeLoadError, match="for topk"):
        load_sae(rescaled)
    gated = write_sae(tmp_path / "d", d_model, RESID, "gated")
    (tmp_path / "d" / "sae_weights.safetensors").write_bytes(
        (write_sae(tmp_path / "e", d_model, RESID) / "sae_weights.safetensors").read_bytes()
    )
    with pytest.raises(SaeLoadError, match="no 'b_gate'"):
        load_sae(gated)
    z_at_resid = write_sae(tmp_path / "f", d_model, Z)
    with pytest.raises(SaeLoadError, match="no head axis"):
        attach_sae(model, RESID, load_sae(z_at_resid))
    with pytest.raises(SaeLoadError, match=r"does not fit .* it reads q_width"):
        attach_sae(model, Z, load_sae(write_sae(tmp_path / "g", heads + 1, Z)))
    with pytest.raises(SaeLoadError, match="does not fit"):
        attach_sae(model, "blocks.0.attn.hook_pattern", load_sae(write_sae(tmp_path / "h", 4, Z)))


def test_editing_the_sae_input_equals_hooked_sae_transformer(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """An edited hook_sae_input is encoded and decoded, and the error term stays that of the
    unedited input (HookedSAETransformer's clean pass reads the host, not the hooked input)."""
    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(tmp_path / "sae", model.cfg.d_model, RESID, "topk", "layer_norm", k=6)
    attach_sae(model, RESID, load_sae(folder))
    edit = [(f"{RESID}.hook_sae_input", lambda value, hook: value * 2.0)]
    ours = model.run_with_hooks(PROMPT, fwd_hooks=edit)
    theirs = hooked_sae_transformer(gpt2_checkpoint)
    with theirs.saes(saes=[saelens_sae(folder)], use_error_term=True):
        expected = theirs.run_with_hooks(PROMPT, fwd_hooks=edit)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("edit", [False, True])
def test_gradients_through_an_sae_equal_hooked_sae_transformer(
    gpt2_checkpoint: Path, tmp_path: Path, edit: bool
) -> None:
    """A backward pass with an SAE attached (error term on) flows as in HookedSAETransformer:
    the error term is a constant, so the host's gradient passes through the SAE's encoder and
    decoder. The gradients at the SAE's points and upstream of it equal SAELens's, unedited
    and with a feature edit; the unedited forward keeps the model's own loss."""
    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(tmp_path / "sae", model.cfg.d_model, RESID, "jumprelu", "none")
    attach_sae(model, RESID, load_sae(folder))
    points = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
    names = ["blocks.0.hook_resid_pre", *(f"{RESID}.{point}" for point in points)]
    fwd = [(f"{RESID}.hook_sae_acts_post", lambda value, hook: value * 0.5)] if edit else []

    def is_compared(name: str) -> bool:
        return name in names

    loss, cache = model.run_with_cache(
        PROMPT, return_type="loss", names_filter=is_compared, incl_bwd=True, fwd_hooks=fwd
    )
    theirs = hooked_sae_transformer(gpt2_checkpoint)
    with theirs.saes(saes=[saelens_sae(folder)], use_error_term=True), theirs.hooks(fwd_hooks=fwd):
        their_loss, their_cache = theirs.run_with_cache(
            PROMPT, return_type="loss", names_filter=is_compared, incl_bwd=True
        )
    torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-5)
    for name in names:
        grad = f"{name}_grad"
        assert grad in their_cache, grad
        torch.testing.assert_close(cache[grad], their_cache[grad], rtol=1e-4, atol=1e-5, msg=grad)
    if not edit:  # the model's own loss (within rounding: a backward pass takes F.linear)
        torch.testing.assert_close(loss, model(PROMPT, return_type="loss"), rtol=1e-6, atol=1e-6)
