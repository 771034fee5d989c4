"""SAEs a key uploads (issue 17: ``POST /v1/saes``, owned by the key, counted in its stored
bytes), in both deployments: a request naming them gets their points, equal to SAELens's own
encode/decode; feature steering through one equals TransformerLens adding the decoder row; the
key's other requests, other keys and the served model never see them; hostile uploads are
refused before the weights are parsed, each with its code."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

import hooklab
from fixtures.saes import write_sae
from fixtures.served import ServeIn
from hooklab import UploadedSae, hooks
from hooklab_server.auth import keys_main
from hooklab_server.settings import Settings

from .e2e_servers import Served, sample_tokens

HOOK = "blocks.1.hook_resid_pre"
MLP_HOOK = "blocks.0.mlp.hook_post"
D_MODEL = 64
D_SAE = 32
SMALL_QUOTA = 25_000  # stored bytes of the key "small": one SAE of D_MODEL x D_SAE, not two


def saelens_sae(folder: Path) -> Any:
    """The oracle: SAELens's own SAE from the same folder."""
    sae_lens = pytest.importorskip("sae_lens")
    return sae_lens.SAE.load_from_disk(str(folder), device="cpu").eval()


def add_key(keys_file: Path, name: str, *args: str) -> str:
    """A key made by the keys command (in this process: the CLI's own function)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert keys_main(["add", name, *args], str(keys_file), list(Settings().quotas())) == 0
    return out.getvalue().strip()


class Uploads:
    def __init__(self, served: Served, keys: dict[str, str], folders: dict[str, Path]) -> None:
        self.served, self.keys, self.folders = served, keys, folders
        self.clients: list[hooklab.HookedTransformer] = []

    def http(self, name: str) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.keys[name]}"}
        return httpx.Client(base_url=self.served.url, headers=headers, timeout=60)

    def client(self, name: str) -> hooklab.HookedTransformer:
        client = hooklab.connect(self.served.url, api_key=self.keys[name])
        self.clients.append(client)
        return client


@pytest.fixture(scope="module")
def uploads(
    serve_in: ServeIn, gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Uploads]:
    root = tmp_path_factory.mktemp("sae-uploads")
    keys_file = root / "keys.json"
    keys = {
        "alice": add_key(keys_file, "alice"),
        "bob": add_key(keys_file, "bob"),
        "small": add_key(keys_file, "small", "--quota", f"stored_bytes={SMALL_QUOTA}"),
    }
    folders = {
        HOOK: write_sae(root / "resid", D_MODEL, HOOK, seed=1),
        MLP_HOOK: write_sae(
            root / "mlp", 4 * D_MODEL, MLP_HOOK, "jumprelu", seed=2, threshold=(0.0, 0.2)
        ),
    }
    # The fixture's own client connects as alice (the key is read when it connects).
    before = os.environ.get("HOOKLAB_API_KEY")
    os.environ["HOOKLAB_API_KEY"] = keys["alice"]
    try:
        context = serve_in(gpt2_checkpoint, Settings(keys_file=str(keys_file)))
        served = context.__enter__()
    finally:
        if before is None:
            del os.environ["HOOKLAB_API_KEY"]
        else:
            os.environ["HOOKLAB_API_KEY"] = before
    state = Uploads(served, keys, folders)
    try:
        yield state
    finally:
        for client in state.clients:
            client.close()
        context.__exit__(None, None, None)


@pytest.fixture
def alice(uploads: Uploads) -> Iterator[hooklab.HookedTransformer]:
    model = uploads.served.model
    model.reset_saes()
    yield model
    model.reset_saes()


def assert_error(response: httpx.Response, status: int, code: str, says: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert says in error["message"], error


def test_uploaded_sae_points_equal_saelens(uploads: Uploads, alice: Any) -> None:
    """add_sae uploads SAELens folders; their points equal SAELens's encode/decode, and the
    forward is the model's own (the error term kept)."""
    served = uploads.served
    resid = alice.add_sae(uploads.folders[HOOK])
    mlp = alice.add_sae(uploads.folders[MLP_HOOK] / "sae_weights.safetensors")
    assert isinstance(resid, UploadedSae) and resid.id.startswith("sae_")
    assert (resid.hook, resid.d_in, resid.d_sae, resid.architecture) == (
        HOOK, D_MODEL, D_SAE, "standard",
    )  # fmt: skip
    assert mlp.architecture == "jumprelu"
    assert alice.saes == {HOOK: D_SAE, MLP_HOOK: D_SAE}
    assert f"{HOOK}.hook_sae_acts_post" in alice.hook_names
    listed = {sae.id: sae for sae in alice.uploaded_saes()}
    assert listed[resid.id].nbytes == 4 * (2 * D_MODEL * D_SAE + D_SAE + D_MODEL)

    tokens = sample_tokens(served.tl, batch=2, pos=6, seed=3)
    tl_logits = served.tl(tokens)
    logits, cache = alice.run_with_cache(tokens)  # every point that fires: the SAEs' too
    torch.testing.assert_close(logits, tl_logits, rtol=1e-4, atol=1e-4)
    for hook in (HOOK, MLP_HOOK):
        sae = saelens_sae(uploads.folders[hook])
        with torch.no_grad():
            acts = sae.encode(cache[hook])
            recons = sae.decode(acts)
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache[f"{hook}.hook_sae_recons"], recons, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            cache[f"{hook}.hook_sae_error"], cache[hook] - recons, rtol=1e-4, atol=1e-5
        )
        assert torch.equal(cache[f"{hook}.hook_sae_output"], cache[hook])
    alice.reset_saes()
    assert alice.saes == {} and f"{HOOK}.hook_sae_input" not in alice.hook_names
    _, cache = alice.run_with_cache(tokens)
    assert not any(".hook_sae_" in name for name in cache)


def test_gated_and_scaled_uploads_equal_their_references(
    uploads: Uploads, alice: Any, tmp_path: Path
) -> None:
    """A gated SAE equals SAELens's; a config's norm_scaling_factor is folded once, as the
    operator's --sae folds it."""
    from hooklab_server.engine.saes import load_sae

    gen = torch.Generator().manual_seed(5)
    gated = tmp_path / "gated"
    gated.mkdir()
    save_file(
        {
            "W_enc": torch.randn(D_MODEL, D_SAE, generator=gen) / D_MODEL**0.5,
            "W_dec": torch.randn(D_SAE, D_MODEL, generator=gen) / D_SAE**0.5,
            "b_dec": torch.randn(D_MODEL, generator=gen) * 0.1,
            "b_gate": torch.randn(D_SAE, generator=gen) * 0.1,
            "b_mag": torch.randn(D_SAE, generator=gen) * 0.1,
            "r_mag": torch.randn(D_SAE, generator=gen) * 0.1,
        },
        gated / "sae_weights.safetensors",
    )
    cfg = json.loads((uploads.folders[HOOK] / "cfg.json").read_text())
    (gated / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "sae_weights.safetensors").write_bytes(
        (uploads.folders[MLP_HOOK] / "sae_weights.safetensors").read_bytes()
    )
    mlp_cfg = json.loads((uploads.folders[MLP_HOOK] / "cfg.json").read_text())
    (scaled / "cfg.json").write_text(
        json.dumps(
            {
                **mlp_cfg,
                "normalize_activations": "expected_average_only_in",
                "norm_scaling_factor": 2.5,
            }
        )
    )

    alice.add_sae(gated)
    alice.add_sae(scaled)
    tokens = sample_tokens(uploads.served.tl, batch=1, pos=6, seed=13)
    _, cache = alice.run_with_cache(tokens)
    with torch.no_grad():
        expected = saelens_sae(gated).encode(cache[HOOK])
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], expected, rtol=1e-4, atol=1e-5)
    reference = load_sae(scaled)
    torch.testing.assert_close(
        cache[f"{MLP_HOOK}.hook_sae_acts_post"], reference.encode(cache[MLP_HOOK]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    for sae in alice.uploaded_saes():
        alice.delete_sae(sae)


def test_feature_steer_through_an_upload_equals_adding_the_decoder_row(
    uploads: Uploads, alice: Any
) -> None:
    served = uploads.served
    sae = alice.upload_sae(uploads.folders[HOOK])
    tokens = sample_tokens(served.tl, batch=2, pos=5, seed=7)
    w_dec = load_file(uploads.folders[HOOK] / "sae_weights.safetensors")["W_dec"]
    ours = alice.run_with_hooks_with_saes(
        tokens, saes=[sae], fwd_hooks=[(HOOK, hooks.feature_steer(3, 6.0))]
    )
    theirs = served.tl.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, lambda x, hook: x + 6.0 * w_dec[3])]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert alice.saes == {}  # attached for that call only
    # ablating a feature at acts_post moves the host by -act * W_dec[f]
    _, cache = alice.run_with_cache_with_saes(
        tokens, saes=[sae], names_filter=[f"{HOOK}.hook_sae_acts_post"]
    )
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    feature = int(acts.sum((0, 1)).argmax())
    ours = alice.run_with_hooks_with_saes(
        tokens, saes=[sae], fwd_hooks=[(HOOK, hooks.feature_ablate(feature))]
    )
    change = -acts[..., feature, None] * w_dec[feature]
    theirs = served.tl.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: x + change)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # and greedy generation steered through it is TransformerLens's with the row added
    alice.add_sae(sae)
    prompt = tokens[:1, :4]
    generated = alice.generate(
        prompt, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
        fwd_hooks=[(HOOK, hooks.feature_steer(5, 8.0))],
    )  # fmt: skip
    with served.tl.hooks(fwd_hooks=[(HOOK, lambda x, hook: x + 8.0 * w_dec[5])]):
        expected = served.tl.generate(
            prompt, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert torch.equal(generated.cpu(), expected.cpu())


def test_python_hook_functions_at_an_uploaded_sae_point(uploads: Uploads, alice: Any) -> None:
    """A Python hook function at an uploaded SAE's point (traced, run on the server) gets the
    feature activations and edits them as the feature spec does."""
    sae = alice.add_sae(uploads.folders[HOOK])
    point = f"{HOOK}.hook_sae_acts_post"
    assert alice.hook_dict[point].name == point
    tokens = sample_tokens(uploads.served.tl, batch=1, pos=5, seed=12)

    def zero_feature(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        acts[..., 4] = 0.0
        return acts

    by_function = alice.run_with_hooks(tokens, fwd_hooks=[(point, zero_feature)])
    by_spec = alice.run_with_hooks(tokens, fwd_hooks=[(HOOK, hooks.feature_ablate(4))])
    torch.testing.assert_close(by_function, by_spec, rtol=1e-5, atol=1e-5)
    alice.reset_saes()
    assert point not in alice.hook_dict
    alice.delete_sae(sae)


def test_curl_recipe_json_body(uploads: Uploads) -> None:
    """What README's curl recipe sends: cfg.json inline, the weights as base64, then a
    run_with_cache naming the SAE's points."""
    folder = uploads.folders[HOOK]
    with uploads.http("alice") as http:
        body = {
            "cfg": json.loads((folder / "cfg.json").read_text()),
            "weights": base64.b64encode((folder / "sae_weights.safetensors").read_bytes()).decode(),
        }
        made = http.post("/v1/saes", json=body)
        assert made.status_code == 201, made.text
        sae_id = made.json()["id"]
        run = http.post(
            "/v1/run_with_cache",
            json={"input": [[1, 2, 3]], "saes": [sae_id], "names": [f"{HOOK}.hook_sae_acts_post"]},
        )
        assert run.status_code == 200, run.text
        assert run.json()["tensors"][f"{HOOK}.hook_sae_acts_post"]["shape"] == [1, 3, D_SAE]
        assert http.delete(f"/v1/saes/{sae_id}").status_code == 204
        gone = http.post("/v1/run_with_cache", json={"input": [[1, 2, 3]], "saes": [sae_id]})
        assert_error(gone, 404, "not_found", sae_id)


def test_other_keys_and_requests_never_see_it(uploads: Uploads, alice: Any) -> None:
    sae = alice.upload_sae(uploads.folders[HOOK])
    point = f"{HOOK}.hook_sae_acts_post"
    with uploads.http("bob") as bob, uploads.http("alice") as mine:
        assert sae.id not in [item["id"] for item in bob.get("/v1/saes").json()["saes"]]
        used = bob.post("/v1/run_with_cache", json={"input": [[1, 2]], "saes": [sae.id]})
        assert_error(used, 404, "not_found")
        assert_error(bob.delete(f"/v1/saes/{sae.id}"), 404, "not_found")
        # the same 404 as for an id that never existed
        assert_error(bob.delete("/v1/saes/sae_nothing"), 404, "not_found")
        # nobody's request without it has its points, and the model does not list them
        for client in (bob, mine):
            plain = client.post("/v1/run_with_cache", json={"input": [[1, 2]], "names": [point]})
            assert_error(plain, 422, "unknown_hook")
        names = [p["name"] for p in mine.get("/v1/model").json()["hook_points"]]
        assert not any(".hook_sae_" in name for name in names)
        # an SAE id is no stored tensor or cache id
        assert_error(mine.get(f"/v1/tensors/{sae.id}"), 404, "not_found")
    assert sae.id in [item.id for item in alice.uploaded_saes()]
    alice.delete_sae(sae)
    assert sae.id not in [item.id for item in alice.uploaded_saes()]


def test_concurrent_requests_with_and_without_saes_keep_their_own(
    uploads: Uploads, alice: Any
) -> None:
    """Requests with different SAE sets, sent at once (the scheduler may merge forwards),
    each get what they get alone."""
    served = uploads.served
    resid = alice.upload_sae(uploads.folders[HOOK])
    mlp = alice.upload_sae(uploads.folders[MLP_HOOK])
    tokens = sample_tokens(served.tl, batch=1, pos=6, seed=11).tolist()
    steer = {"hook": HOOK, "op": "feature_steer", "feature": 2, "coeff": 5.0}
    bodies = [
        {"input": tokens, "names": [HOOK]},
        {"input": tokens, "names": [HOOK, f"{HOOK}.hook_sae_recons"], "saes": [resid.id]},
        {"input": tokens, "names": [f"{MLP_HOOK}.hook_sae_acts_post"], "saes": [mlp.id]},
        {"input": tokens, "names": ["blocks.1.hook_resid_post"], "saes": [resid.id],
         "hooks": [steer]},
        {"input": tokens, "names": ["blocks.1.hook_resid_post"]},
    ]  # fmt: skip
    with uploads.http("alice") as http:

        def run(body: dict[str, Any]) -> dict[str, Any]:
            response = http.post("/v1/run_with_cache", json=body)
            assert response.status_code == 200, response.text
            return response.json()["tensors"]

        alone = [run(body) for body in bodies]
        with ThreadPoolExecutor(4) as pool:  # alice's concurrent_requests quota
            together = list(pool.map(run, bodies * 4))
    for index, result in enumerate(together):
        expected = alone[index % len(bodies)]
        assert result.keys() == expected.keys()
        for name, value in result.items():
            torch.testing.assert_close(
                torch.tensor(value["data"]), torch.tensor(expected[name]["data"]),
                rtol=1e-4, atol=1e-4,
            )  # fmt: skip
    # the steered run differs from the plain one by the decoder row, the plain one is TL's
    w_dec = load_file(uploads.folders[HOOK] / "sae_weights.safetensors")["W_dec"]
    _, tl_cache = served.tl.run_with_cache(torch.tensor(tokens))
    plain = torch.tensor(alone[4]["blocks.1.hook_resid_post"]["data"]).view(1, 6, D_MODEL)
    torch.testing.assert_close(plain, tl_cache["blocks.1.hook_resid_post"], rtol=1e-4, atol=1e-4)
    with served.tl.hooks(fwd_hooks=[(HOOK, lambda x, hook: x + 5.0 * w_dec[2])]):
        _, tl_steered = served.tl.run_with_cache(torch.tensor(tokens))
    steered = torch.tensor(alone[3]["blocks.1.hook_resid_post"]["data"]).view(1, 6, D_MODEL)
    torch.testing.assert_close(
        steered, tl_steered["blocks.1.hook_resid_post"], rtol=1e-4, atol=1e-4
    )
    for sae in (resid, mlp):
        alice.delete_sae(sae)


def test_uploads_count_in_stored_bytes(uploads: Uploads) -> None:
    small = uploads.client("small")
    first = small.upload_sae(uploads.folders[HOOK])
    with uploads.http("small") as http:
        usage = http.get("/v1/usage").json()["usage"]
        assert usage["stored_bytes"] >= first.nbytes
        folder = uploads.folders[HOOK]
        body = {
            "cfg": (folder / "cfg.json").read_text(),
            "weights": base64.b64encode((folder / "sae_weights.safetensors").read_bytes()).decode(),
        }
        assert_error(http.post("/v1/saes", json=body), 429, "quota", "stored_bytes")
        small.delete_sae(first)
        again = http.post("/v1/saes", json=body)
        assert again.status_code == 201, again.text
        assert http.delete(f"/v1/saes/{again.json()['id']}").status_code == 204


def _upload(http: httpx.Client, cfg: Any, weights: bytes, **extra: Any) -> httpx.Response:
    body = {"cfg": cfg, "weights": base64.b64encode(weights).decode(), **extra}
    return http.post("/v1/saes", json=body)


def test_hostile_uploads_are_refused_each_with_its_code(uploads: Uploads, tmp_path: Path) -> None:
    folder = uploads.folders[HOOK]
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = (folder / "sae_weights.safetensors").read_bytes()
    with uploads.http("alice") as http:
        before = http.get("/v1/saes").json()["saes"]
        big = {**cfg, "padding": "x" * 70_000}
        assert_error(_upload(http, big, weights), 413, "too_large", "SAE config")
        assert_error(_upload(http, "{not json", weights), 422, "validation_error", "config")
        assert_error(
            _upload(http, {**cfg, "d_in": D_MODEL + 1}, weights), 422, "bad_shape", "does not fit"
        )
        assert_error(
            _upload(http, cfg, weights, hook="blocks.9.hook_resid_pre"), 422, "unknown_hook"
        )
        assert_error(
            _upload(http, cfg, weights, hook="blocks.0.attn.hook_pattern"), 422, "bad_shape"
        )
        # a config of two features with megabytes of weights: refused before parsing them
        tiny = {**cfg, "d_sae": 2}
        assert_error(_upload(http, tiny, weights + bytes(2 << 20)), 413, "too_large", "allows")
        # a config whose shapes pass the server's limit
        huge = {**cfg, "d_sae": 2**22}
        assert_error(_upload(http, huge, weights), 413, "too_large", "max_sae_bytes")
        assert_error(
            _upload(http, cfg, b"\x80\x04pickle" * 100), 422, "validation_error", "not safetensors"
        )
        # safetensors whose tensors are not the config's
        other = write_sae(tmp_path / "other", D_MODEL, HOOK, seed=3)
        mismatch = {**cfg, "d_sae": D_SAE * 2}
        assert_error(
            _upload(http, mismatch, (other / "sae_weights.safetensors").read_bytes()),
            422, "bad_shape", "W_enc",
        )  # fmt: skip
        bad_b64 = http.post("/v1/saes", json={"cfg": cfg, "weights": "***"})
        assert_error(bad_b64, 422, "validation_error", "base64")
        assert http.get("/v1/saes").json()["saes"] == before  # nothing was stored
        # requests naming SAEs: duplicates, two at one hook, too many
        sae = _upload(http, cfg, weights).json()["id"]
        twice = http.post("/v1/run_with_hooks", json={"input": [[1]], "saes": [sae, sae]})
        assert_error(twice, 422, "validation_error", "twice")
        other_id = _upload(http, cfg, weights).json()["id"]
        same_hook = http.post("/v1/run_with_hooks", json={"input": [[1]], "saes": [sae, other_id]})
        assert_error(same_hook, 422, "conflicting_specs", HOOK)
        for made in (sae, other_id):
            assert http.delete(f"/v1/saes/{made}").status_code == 204
