"""SAEs served beside the model (issue 17) in both deployments (scaled out, the workers get the
same ``--sae`` flags): /v1/model lists their hook points, the client's run_with_cache returns
them (equal to SAELens's encode/decode), they are patched and spec'd like any point, and the
forward is the model's own unless an edit is made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.saes import write_sae
from hooklab import hooks
from hooklab_server.settings import Settings

from .e2e_servers import Served, sample_tokens

HOOK = "blocks.1.hook_resid_pre"
MLP_HOOK = "blocks.0.mlp.hook_post"
Z_HOOK = "blocks.0.attn.hook_z"  # a gated, layer-normed SAE over the heads side by side
D_SAE = 32


def encode(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's standard encode and decode: (feature acts, reconstruction)."""
    w = load_file(folder / "sae_weights.safetensors")
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


def write_gated_z_sae(folder: Path, d_in: int, seed: int) -> Path:
    """A random gated SAE for hook_z in SAELens's saved layout (heads flattened, layer_norm)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file(
        {
            "W_enc": torch.randn(d_in, D_SAE, generator=gen) / d_in**0.5,
            "W_dec": torch.randn(D_SAE, d_in, generator=gen) / D_SAE**0.5,
            "b_dec": torch.randn(d_in, generator=gen) * 0.1,
            "b_gate": torch.randn(D_SAE, generator=gen) * 0.2,
            "b_mag": torch.randn(D_SAE, generator=gen) * 0.2,
            "r_mag": torch.randn(D_SAE, generator=gen) * 0.3,
        },
        folder / "sae_weights.safetensors",
    )
    cfg = {
        "architecture": "gated", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm", "reshape_activations": "hook_z",
        "metadata": {"hook_name": Z_HOOK, "sae_lens_version": "6.54.0"},
    }  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


class SaeServed:
    def __init__(self, served: Served, folders: dict[str, Path]) -> None:
        self.served, self.folders = served, folders


@pytest.fixture(scope="module")
def sae_server(
    serve_in, gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SaeServed]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("saes")
    d_model = 64
    folders = {
        HOOK: write_sae(root / "resid", d_model, HOOK, seed=1),
        MLP_HOOK: write_sae(root / "mlp", 4 * d_model, MLP_HOOK, seed=2),
        Z_HOOK: write_gated_z_sae(root / "z", d_model, 3),  # 4 heads of 16
    }
    settings = Settings(sae=tuple(f"{folder}@{hook}" for hook, folder in folders.items()))
    with serve_in(gpt2_checkpoint, settings) as served:
        yield SaeServed(served, folders)


def test_model_lists_the_sae_points(sae_server: SaeServed) -> None:
    info = httpx.get(f"{sae_server.served.url}/v1/model").json()
    points = {point["name"]: point for point in info["hook_points"]}
    names = [point["name"] for point in info["hook_points"]]
    after = names[names.index(HOOK) + 1 : names.index(HOOK) + 7]
    assert after == [
        f"{HOOK}.hook_sae_{point}"
        for point in ("input", "acts_pre", "acts_post", "recons", "error", "output")
    ]
    assert points[f"{HOOK}.hook_sae_acts_post"]["shape"] == ["batch", "pos", f"d_sae[{HOOK}]"]
    assert points[f"{MLP_HOOK}.hook_sae_recons"]["shape"] == ["batch", "pos", "d_mlp"]
    assert info["cfg"]["sae_widths"] == {HOOK: D_SAE, MLP_HOOK: D_SAE, Z_HOOK: D_SAE}
    assert sae_server.served.model.saes == {HOOK: D_SAE, MLP_HOOK: D_SAE, Z_HOOK: D_SAE}
    assert points[f"{Z_HOOK}.hook_sae_input"]["shape"] == ["batch", "pos", "q_width"]
    assert points[f"{Z_HOOK}.hook_sae_output"]["shape"] == ["batch", "pos", "head", "d_head"]


def test_cache_has_saelens_values_and_the_forward_is_unchanged(sae_server: SaeServed) -> None:
    served = sae_server.served
    tokens = sample_tokens(served.tl, batch=2, pos=6, seed=3)
    tl_logits, tl_cache = served.tl.run_with_cache(tokens)
    logits, cache = served.model.run_with_cache(tokens)
    torch.testing.assert_close(logits, tl_logits, rtol=1e-4, atol=1e-4)
    for hook, folder in sae_server.folders.items():
        if hook == Z_HOOK:
            continue  # gated, layer-normed and per head: the test below
        acts, recons = encode(folder, cache[hook])
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache[f"{hook}.hook_sae_recons"], recons, rtol=1e-4, atol=1e-5)
        assert torch.equal(cache[f"{hook}.hook_sae_output"], cache[hook])
        torch.testing.assert_close(cache[hook], tl_cache[hook], rtol=1e-4, atol=1e-4)


def test_specs_at_sae_points_steer_by_the_decoder_row(sae_server: SaeServed) -> None:
    """Ablating a feature (an ablate spec with a neuron selector at acts_post) moves the host
    point by -act * W_dec[f]; TransformerLens, hooked there with that change, agrees."""
    served = sae_server.served
    tokens = sample_tokens(served.tl, batch=1, pos=5, seed=4)
    _, cache = served.model.run_with_cache(tokens, names_filter=[f"{HOOK}.hook_sae_acts_post"])
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    feature = int(acts[0].sum(0).argmax())
    spec = hooks.ablate(neuron=feature)
    ours = served.model.run_with_hooks(tokens, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", spec)])
    row = load_file(sae_server.folders[HOOK] / "sae_weights.safetensors")["W_dec"][feature]
    change = -acts[..., feature, None] * row
    theirs = served.tl.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: x + change)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sae_points_are_patched_from_a_stored_cache(sae_server: SaeServed) -> None:
    """Patching the clean run's features into a corrupted run passes on the clean
    reconstruction plus the corrupted run's own error term."""
    served = sae_server.served
    clean = sample_tokens(served.tl, batch=1, pos=5, seed=5)
    corrupted = sample_tokens(served.tl, batch=1, pos=5, seed=6)
    point = f"{HOOK}.hook_sae_acts_post"
    _, stored = served.model.run_with_cache(clean, names_filter=[point], store=True)
    spec = hooks.patch(stored.cache_id)
    _, patched = served.model.run_with_cache(
        corrupted, fwd_hooks=[(point, spec)], names_filter=[HOOK, f"{HOOK}.hook_sae_output"]
    )
    folder = sae_server.folders[HOOK]
    w = load_file(folder / "sae_weights.safetensors")
    _, corrupted_recons = encode(folder, patched[HOOK])
    expected = stored[point] @ w["W_dec"] + w["b_dec"] + (patched[HOOK] - corrupted_recons)
    torch.testing.assert_close(patched[f"{HOOK}.hook_sae_output"], expected, rtol=1e-4, atol=1e-4)


def test_feature_steer_equals_adding_the_decoder_row_in_transformer_lens(
    sae_server: SaeServed,
) -> None:
    served = sae_server.served
    tokens = sample_tokens(served.tl, batch=2, pos=5, seed=7)
    w_dec = load_file(sae_server.folders[HOOK] / "sae_weights.safetensors")["W_dec"]
    ours = served.model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hooks.feature_steer(3, 6.0))])
    theirs = served.tl.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, lambda x, hook: x + 6.0 * w_dec[3])]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # at some positions of one row only, and several features at once
    ours = served.model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, hooks.feature_steer([1, 2], -2.0, batch=1, pos=[0, 3]))]
    )
    change = torch.zeros(2, 5, 64)
    change[1, [0, 3]] = -2.0 * (w_dec[1] + w_dec[2])
    theirs = served.tl.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: x + change)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_feature_ablate_and_clamp_set_the_features(sae_server: SaeServed) -> None:
    served = sae_server.served
    tokens = sample_tokens(served.tl, batch=1, pos=5, seed=8)
    point = f"{HOOK}.hook_sae_acts_post"
    _, cache = served.model.run_with_cache(tokens, names_filter=[point])
    acts = cache[point]
    feature = int(acts[0].sum(0).argmax())
    w_dec = load_file(sae_server.folders[HOOK] / "sae_weights.safetensors")["W_dec"]
    for spec, new in (
        (hooks.feature_ablate(feature), 0.0),
        (hooks.feature_clamp(feature, 5.0), 5.0),
    ):
        logits, edited = served.model.run_with_cache(
            tokens, fwd_hooks=[(HOOK, spec)], names_filter=[point]
        )
        assert torch.all(edited[point][..., feature] == new)
        change = (new - acts[..., feature, None]) * w_dec[feature]
        theirs = served.tl.run_with_hooks(
            tokens, fwd_hooks=[(HOOK, lambda x, hook, change=change: x + change)]
        )
        torch.testing.assert_close(logits, theirs, rtol=1e-4, atol=1e-4)


def test_feature_specs_are_checked(sae_server: SaeServed) -> None:
    url = sae_server.served.url
    body = {
        "input": [[1, 2, 3]],
        "hooks": [{"hook": "blocks.0.hook_resid_pre", "op": "feature_ablate", "feature": 1}],
    }
    response = httpx.post(f"{url}/v1/run_with_hooks", json=body)
    assert response.status_code == 422, response.text
    assert "no sparse autoencoder reads 'blocks.0.hook_resid_pre'" in response.text
    body["hooks"] = [{"hook": HOOK, "op": "feature_steer", "feature": D_SAE}]
    response = httpx.post(f"{url}/v1/run_with_hooks", json=body)
    assert response.status_code == 422, response.text
    assert "out of range" in response.text


def test_feature_specs_steer_generation_as_transformer_lens(sae_server: SaeServed) -> None:
    """Greedy generation with a feature steered (at the host) and one clamped (through the SAE,
    run on every step) gives TransformerLens's tokens with the same change at the hook."""
    served = sae_server.served
    tokens = sample_tokens(served.tl, batch=1, pos=4, seed=9)
    w_dec = load_file(sae_server.folders[HOOK] / "sae_weights.safetensors")["W_dec"]
    ours = served.model.generate(
        tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False,
        fwd_hooks=[(HOOK, hooks.feature_steer(5, 8.0))],
    )  # fmt: skip
    with served.tl.hooks(fwd_hooks=[(HOOK, lambda x, hook: x + 8.0 * w_dec[5])]):
        theirs = served.tl.generate(
            tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert torch.equal(ours.cpu(), theirs.cpu())
    clamped = served.model.generate(
        tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False,
        fwd_hooks=[(HOOK, hooks.feature_clamp(5, 0.0))],
    )  # fmt: skip
    w = load_file(sae_server.folders[HOOK] / "sae_weights.safetensors")

    def clamp_to_zero(x: torch.Tensor, hook: object) -> torch.Tensor:
        act = torch.relu((x - w["b_dec"]) @ w["W_enc"][:, 5] + w["b_enc"][5])
        return x - act[..., None] * w["W_dec"][5]

    with served.tl.hooks(fwd_hooks=[(HOOK, clamp_to_zero)]):
        theirs = served.tl.generate(
            tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert torch.equal(clamped.cpu(), theirs.cpu())


def test_a_hook_z_sae_over_the_wire_equals_saelens(sae_server: SaeServed) -> None:
    """The client's cache of a per-head SAE's points is SAELens's own (heads flattened in,
    shaped back out), a function hook at its features runs on the client with their shape, and
    feature_steer adds the decoder row laid out per head, as adding it in TransformerLens."""
    sae_lens = pytest.importorskip("sae_lens")
    served = sae_server.served
    folder = sae_server.folders[Z_HOOK]
    tokens = sample_tokens(served.tl, batch=2, pos=5, seed=11)
    names = [Z_HOOK, *(f"{Z_HOOK}.hook_sae_{p}" for p in ("input", "acts_post", "recons"))]
    _, cache = served.model.run_with_cache(tokens, names_filter=names)
    sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu").eval()
    with torch.no_grad():
        _, theirs = sae.run_with_cache(cache[Z_HOOK].cpu())
    for point in ("input", "acts_post", "recons"):
        ours = cache[f"{Z_HOOK}.hook_sae_{point}"].cpu()
        torch.testing.assert_close(ours, theirs[f"hook_sae_{point}"], rtol=1e-4, atol=1e-5)
    assert cache[f"{Z_HOOK}.hook_sae_input"].shape == (2, 5, 64)

    feature = int(cache[f"{Z_HOOK}.hook_sae_acts_post"][0].sum(0).argmax())
    seen: list[tuple[int, ...]] = []

    def ablate(value: torch.Tensor, hook: object) -> torch.Tensor:
        seen.append(tuple(value.shape))
        value = value.clone()
        value[..., feature] = 0
        return value

    edited = served.model.run_with_hooks(
        tokens, fwd_hooks=[(f"{Z_HOOK}.hook_sae_acts_post", ablate)]
    )
    assert seen and seen[0] == (2, 5, D_SAE)
    z = cache[Z_HOOK].cpu()
    with torch.no_grad():
        acts = sae.encode(z)
        acts[..., feature] = 0
        change = sae.decode(acts) - sae(z)
    theirs = served.tl.run_with_hooks(
        tokens, fwd_hooks=[(Z_HOOK, lambda x, hook: x + change.to(x.device))]
    )
    torch.testing.assert_close(edited, theirs, rtol=1e-4, atol=1e-4)

    row = 4.0 * load_file(folder / "sae_weights.safetensors")["W_dec"][feature].view(4, 16)
    steered = served.model.run_with_hooks(
        tokens, fwd_hooks=[(Z_HOOK, hooks.feature_steer(feature, 4.0))]
    )
    theirs = served.tl.run_with_hooks(
        tokens, fwd_hooks=[(Z_HOOK, lambda x, hook: x + row.to(x.device))]
    )
    torch.testing.assert_close(steered, theirs, rtol=1e-4, atol=1e-4)
