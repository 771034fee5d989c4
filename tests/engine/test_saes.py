"""Sparse autoencoders attached beside the model (issue 17): SAELens's saved format, its hook
points, the error term, and steering by a decoder row against TransformerLens.

The oracle is SAELens 6.54 itself (``SAE.load_from_disk`` on the same folder, its ``encode``
and ``decode``); a reference written here from SAELens's documented math checks the same, and
the folders are written in SAELens's saved layout by hand and by SAELens's own ``save_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures import saes
from hooklab_server.engine import load_model
from hooklab_server.engine.catalogue import axis_sizes, hook_shape
from hooklab_server.engine.saes import SaeLoadError, attach_sae, load_sae, parse_sae_flag

HOOK = "blocks.0.hook_resid_post"
D_SAE = 48


def write_sae(folder: Path, d_in: int, architecture: str = "standard", **extra: object) -> Path:
    return saes.write_sae(folder, d_in, HOOK, architecture, d_sae=D_SAE, **extra)


POINTS = (
    "hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
    "hook_sae_error", "hook_sae_output",
)  # fmt: skip


def reference_encode(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's encode, from its documentation: (hidden_pre, feature_acts)."""
    from safetensors.torch import load_file

    w = load_file(folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "jumprelu":
        acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).float()
    elif cfg["architecture"] == "topk":
        values, indices = torch.topk(hidden_pre, cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, indices, torch.relu(values))
    else:
        acts = torch.relu(hidden_pre)
    return hidden_pre, acts


def reference_decode(folder: Path, acts: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    w = load_file(folder / "sae_weights.safetensors")
    return acts @ w["W_dec"] + w["b_dec"]


def saelens_sae(folder: Path):  # type: ignore[no-untyped-def]
    """SAELens's own SAE from the folder (the oracle environment has sae_lens)."""
    sae_lens = pytest.importorskip("sae_lens")
    return sae_lens.SAE.load_from_disk(str(folder), device="cpu").eval()


def test_a_folder_saelens_saved_is_served(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    """SAELens's save_model writes a folder the server loads, and both encode alike."""
    sae = saelens_sae(write_sae(tmp_path / "ours", 64, "jumprelu"))
    saved = tmp_path / "saved"
    sae.save_model(str(saved))
    model = load_model(str(gpt2_checkpoint))
    attach_sae(model, HOOK, load_sae(saved))
    _, cache = model.run_with_cache("The cat", names_filter=[HOOK, f"{HOOK}.hook_sae_acts_post"])
    with torch.no_grad():
        expected = sae.encode(cache[HOOK])
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], expected)


@pytest.mark.parametrize(
    ("architecture", "extra"),
    [("standard", {}), ("jumprelu", {}), ("topk", {"k": 5})],
)
def test_sae_points_equal_saelens_encode_decode(
    gpt2_checkpoint: Path, tmp_path: Path, architecture: str, extra: dict[str, object]
) -> None:
    model = load_model(str(gpt2_checkpoint))
    plain_logits, plain = model.run_with_cache("The cat sat on the mat")
    folder = write_sae(tmp_path / "sae", model.cfg.d_model, architecture, **extra)
    attach_sae(model, HOOK, load_sae(folder))
    names = [f"{HOOK}.{point}" for point in POINTS]
    assert (
        model.hook_names[model.hook_names.index(HOOK) + 1 : model.hook_names.index(HOOK) + 7]
        == names
    )
    logits, cache = model.run_with_cache("The cat sat on the mat")
    # The error term keeps the forward exactly as it was.
    assert torch.equal(logits, plain_logits)
    x = plain[HOOK]
    hidden_pre, acts = reference_encode(folder, x)
    recons = reference_decode(folder, acts)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], x)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_pre"], hidden_pre)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], acts)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], recons)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - recons)
    assert torch.equal(cache[f"{HOOK}.hook_sae_output"], x)
    saelens = saelens_sae(folder)
    with torch.no_grad():
        feature_acts = saelens.encode(x)
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], feature_acts)
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], saelens.decode(feature_acts))
    if architecture == "topk":
        assert int((cache[f"{HOOK}.hook_sae_acts_post"] != 0).sum(-1).max()) <= 5
    assert hook_shape(f"{HOOK}.hook_sae_acts_post", model.cfg) == ("batch", "pos", f"d_sae[{HOOK}]")
    assert axis_sizes(model.cfg, 1, 3)[f"d_sae[{HOOK}]"] == D_SAE


def test_editing_features_changes_the_forward_by_the_decoder_change(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """Zeroing a feature at acts_post changes the host activation by -act * W_dec[f] (the error
    term stays that of the clean reconstruction), as SAELens's HookedSAETransformer does."""
    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(tmp_path / "sae", model.cfg.d_model)
    attach_sae(model, HOOK, load_sae(folder))
    _, cache = model.run_with_cache("The cat sat", names_filter=[f"{HOOK}.hook_sae_acts_post"])
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    feature = int(acts[0].sum(0).argmax())

    def ablate(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        value[..., feature] = 0
        return value

    _, edited = model.run_with_cache(
        "The cat sat",
        fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", ablate)],
        names_filter=[HOOK, f"{HOOK}.hook_sae_output", "blocks.1.hook_resid_pre"],
    )
    w_dec = load_sae(folder).W_dec
    expected = edited[HOOK] - acts[..., feature, None] * w_dec[feature]
    torch.testing.assert_close(edited[f"{HOOK}.hook_sae_output"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edited["blocks.1.hook_resid_pre"], expected, rtol=1e-5, atol=1e-5)


def test_steering_by_a_decoder_row_equals_transformer_lens(
    gpt2_checkpoint: Path, tmp_path: Path
) -> None:
    """Adding coeff to a feature's activation equals adding coeff * W_dec[f] at the hook point
    in TransformerLens."""
    from fixtures.oracle import load_tl_model

    model = load_model(str(gpt2_checkpoint))
    folder = write_sae(tmp_path / "sae", model.cfg.d_model)
    sae = load_sae(folder)
    attach_sae(model, HOOK, sae)
    feature, coeff = 7, 4.0

    def steer(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        value[..., feature] += coeff
        return value

    ours = model.run_with_hooks("The cat sat", fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", steer)])
    tl = load_tl_model(gpt2_checkpoint)
    row = sae.W_dec[feature]
    theirs = tl.run_with_hooks(
        "The cat sat", fwd_hooks=[(HOOK, lambda value, hook: value + coeff * row)]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bad_saes_are_refused(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(str(gpt2_checkpoint))
    wrong_width = write_sae(tmp_path / "wide", model.cfg.d_model + 1)
    with pytest.raises(SaeLoadError, match="does not fit"):
        attach_sae(model, HOOK, load_sae(wrong_width))
    with pytest.raises(SaeLoadError, match="no hook point"):
        attach_sae(model, "blocks.9.hook_resid_post", load_sae(write_sae(tmp_path / "ok", 64)))
    bad = write_sae(tmp_path / "bad", model.cfg.d_model)
    (bad / "cfg.json").write_text(json.dumps({"d_in": -1, "d_sae": D_SAE}))
    with pytest.raises(SaeLoadError, match="invalid SAE config"):
        load_sae(bad)
    topk = write_sae(tmp_path / "topk", model.cfg.d_model, "topk")
    with pytest.raises(SaeLoadError, match="k between"):
        load_sae(topk)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "cfg.json").write_text((bad.parent / "ok" / "cfg.json").read_text())
    (tmp_path / "pickle" / "sae_weights.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(SaeLoadError, match="cannot read"):
        load_sae(tmp_path / "pickle")
    assert parse_sae_flag("/a/b@c@blocks.0.hook_resid_pre") == ("/a/b@c", "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="PATH@HOOK"):
        parse_sae_flag("/a/b")
