"""The JavaScript client (client/js) under Node's own test runner: its unit tests (golden vectors,
frame streams, a stand-in HTTP server, the TypeScript declarations), and its live tests against
the session GPT-2 server, in each deployment, with TransformerLens 3.9's numbers on the same
weights as the reference (written to a JSON file the Node tests read).

Node.js (``node`` and ``npm``) must be installed; ``npm ci`` runs once, when client/js has no
``node_modules`` matching its package-lock.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e.e2e_servers import PROMPTS, Served, sample_tokens
from e2e.test_sae_top_k import write_sae
from transformer_lens import patching as tl_patching

from hooklab import hooks, metrics
from hooklab_server.settings import Settings

JS_DIR = Path(__file__).resolve().parents[2] / "client" / "js"
LIVE_TESTS = "test/live.test.js"
NODE_TIMEOUT_S = 180

# Calls of the hook-spec and metric builders, (name, every positional arg, keyword args): the
# Node tests make the same calls (the positional args, then the keyword args as one options
# object) and must get the wire forms Python's builders give.
HOOK_CALLS: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("ablate", ["zero"], {}),
    ("ablate", ["mean"], {"head": [1], "pos": 2, "mean_over": "pos"}),
    ("ablate", ["resample"], {"source_batch": [1, 0], "batch": [0, 1]}),
    ("patch", ["c_123"], {"pos": [3], "head": 0}),
    ("patch", [None], {"source_row": 1, "neuron": [4, 5]}),
    ("steer", ["t_9", 1.0], {"head": 2}),
    ("steer", ["t_9", 4.0], {"pos": -1}),
    ("scale", [0.5], {"head": [0, 2]}),
    ("clamp", [None, 2.0], {}),
    ("clamp", [-1.0, 1.0], {"neuron": 3}),
    ("set", [0.0], {"batch": 0}),
    ("set", ["t_9"], {}),
    ("project_out", ["t_9"], {"pos": [1, 2]}),
]
METRIC_CALLS: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("logit_diff", [5, 6, -1], {}),
    ("logit_diff", [[5, 7], [6, 8], [-1, -2]], {"normalize": True, "reduce": "sum"}),
    ("logit", [5, -1], {"baselines": [1.0, 0.0], "normalize": True}),
    ("prob", [5, 3], {}),
    ("logprob", [5, -1], {"reduce": "sum"}),
    ("loss", [], {"normalize": True}),
]


@pytest.fixture(scope="session")
def npm_installed() -> str:
    """client/js's dependencies installed (``npm ci``, only when they are missing or stale);
    answers the path of ``node``."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed")
    lock, installed = JS_DIR / "package-lock.json", JS_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"npm ci failed in {JS_DIR}:\n{done.stdout}\n{done.stderr}")
    return node


def run_node(node: str, files: list[str], folder: Path, env: dict[str, str] | None = None) -> None:
    """``node --test`` on ``files`` (relative to client/js); fails with Node's report unless
    every test ran and passed (the TAP summary, written to ``folder``, counts them)."""
    tap = folder / "node-tests.tap"
    done = subprocess.run(
        [node, "--test", "--test-reporter=spec", "--test-reporter-destination=stdout",
         "--test-reporter=tap", f"--test-reporter-destination={tap}", *files],
        cwd=JS_DIR, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )  # fmt: skip
    report = f"node --test {' '.join(files)}:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    summary = dict(
        line[2:].split(" ", 1) for line in tap.read_text().splitlines() if line.startswith("# ")
    )
    assert int(summary.get("pass", "0")) > 0, report
    assert summary.get("skipped") == "0", report


def test_js_unit_tests(npm_installed: str, tmp_path: Path) -> None:
    unit = sorted(
        str(path.relative_to(JS_DIR))
        for path in (JS_DIR / "test").glob("*.test.js")
        if path.name != Path(LIVE_TESTS).name
    )
    run_node(npm_installed, unit, tmp_path)


def _tensor(value: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(value.shape), "data": value.detach().flatten().tolist()}


def reference(served: Served) -> dict[str, Any]:
    """What the Node tests compare with: TransformerLens on the served weights, and the wire
    forms of the Python client's hook specs and metrics."""
    tl = served.tl
    prompt = PROMPTS[1]
    tokens = tl.to_tokens(prompt)
    names = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"]
    logits, cache = tl.run_with_cache(tokens, names_filter=names)

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, 1] = 0.0
        return z

    ablated = tl.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    steer_hook, coeff = "blocks.1.hook_resid_pre", 3.0
    vector = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(3))
    steered = tl.run_with_hooks(
        tokens, fwd_hooks=[(steer_hook, lambda x, hook: x + coeff * vector)]
    )
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False)
    return {
        "prompt": prompt,
        "model_name": served.model.cfg.model_name,
        "n_layers": tl.cfg.n_layers,
        "tokens": tokens.tolist(),
        "logits": _tensor(logits),
        "loss": tl(tokens, return_type="loss").item(),
        "cache": {name: _tensor(cache[name]) for name in names},
        "ablated_logits": _tensor(ablated),
        "steer": {
            "hook": steer_hook,
            "coeff": coeff,
            "vector": vector.tolist(),
            "logits": _tensor(steered),
        },
        "generated": tl.generate(tokens, max_new_tokens=6, **greedy).tolist(),
        "patching": _patching_reference(tl, tokens),
        "hook_calls": [
            _call(name, args, kwargs, getattr(hooks, name)(*args, **kwargs).at(SPEC_HOOK))
            for name, args, kwargs in HOOK_CALLS
        ],
        "metric_calls": [
            _call(name, args, kwargs, getattr(metrics, name)(*args, **kwargs).to_wire())
            for name, args, kwargs in METRIC_CALLS
        ],
    }


SPEC_HOOK = "blocks.0.hook_resid_pre"  # where the Node tests apply the compared specs


def _call(name: str, args: list[Any], kwargs: dict[str, Any], wire: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "kwargs": kwargs, "wire": wire}


def _patching_reference(tl: Any, clean: torch.Tensor) -> dict[str, Any]:
    """TransformerLens's resid_pre patching sweep of a one-token corruption, metric the logit
    difference at the last position."""
    corrupted = clean.clone()
    corrupted[0, 2] = (int(clean[0, 2]) + 1) % tl.cfg.d_vocab
    answer, wrong = int(clean[0, -1]), int(corrupted[0, 2])
    _, clean_cache = tl.run_with_cache(clean)
    sweep = tl_patching.get_act_patch_resid_pre(
        tl, corrupted, clean_cache, lambda out: out[0, -1, answer] - out[0, -1, wrong]
    )
    return {
        "clean": clean.tolist(),
        "corrupted": corrupted.tolist(),
        "answer": answer,
        "wrong": wrong,
        "metric": _tensor(sweep),
    }


def test_js_client_against_the_server(
    npm_installed: str, gpt2_server: Served, tmp_path: Path
) -> None:
    path = tmp_path / "reference.json"
    with torch.inference_mode():
        path.write_text(json.dumps(reference(gpt2_server)))
    env = {"HOOKLAB_TEST_URL": gpt2_server.url, "HOOKLAB_TEST_REFERENCE": str(path)}
    run_node(npm_installed, [LIVE_TESTS], tmp_path, env)


# --- sparse autoencoders: feature specs and the sparse top-k form --------------------------

LIVE_SAE_TESTS = "test/live_saes.js"  # not a *.test.js: it needs the SAE server below
SAE_HOOK = "blocks.1.hook_resid_pre"
SAE_WIDTH = 256
FEATURE_CALLS: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("feature_steer", [3, 1.0], {}),
    ("feature_steer", [[1, 2], 4.0], {"pos": -1}),
    ("feature_ablate", [5], {"batch": [0]}),
    ("feature_clamp", [2, 0.5], {"pos": [0, 1]}),
]


@pytest.fixture(scope="module")
def sae_served(
    serve_in: Any, gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """GPT-2 with a JumpReLU SAE at SAE_HOOK, in this session's deployment."""
    folder = write_sae(tmp_path_factory.mktemp("js-sae") / "resid", 64, SAE_WIDTH, 7)
    with serve_in(gpt2_checkpoint, Settings(sae=(f"{folder}@{SAE_HOOK}",))) as served:
        yield served


def sae_reference(served: Served) -> dict[str, Any]:
    """The dense SAE activations and torch.topk of them, from the Python client on the same
    server, and the logits its feature specs give."""
    model, k = served.model, 8
    acts = f"{SAE_HOOK}.hook_sae_acts_post"
    tokens = sample_tokens(served.tl, batch=2, pos=5, seed=21)
    _, cache = model.run_with_cache(tokens, names_filter=[acts], lazy=False)
    dense = cache[acts]
    values, _ = torch.topk(dense, k, dim=-1)
    feature = int(dense.sum((0, 1)).argmax())
    steer, clamp = hooks.feature_steer(feature, 4.0), hooks.feature_clamp(feature, 3.0, pos=-1)
    steered = model.run_with_hooks(tokens, fwd_hooks=[(SAE_HOOK, steer)])
    clamped = model.run_with_hooks(tokens, fwd_hooks=[(SAE_HOOK, clamp)])
    return {
        "hook": SAE_HOOK,
        "acts": acts,
        "sae_widths": {SAE_HOOK: SAE_WIDTH},
        "d_sae": SAE_WIDTH,
        "tokens": tokens.tolist(),
        "k": k,
        "active": int((dense > 0).sum(-1).max()),
        "dense": _tensor(dense),
        "top_values": _tensor(values),
        "feature_calls": [
            _call(name, args, kwargs, getattr(hooks, name)(*args, **kwargs).at(SAE_HOOK))
            for name, args, kwargs in FEATURE_CALLS
        ],
        "steer": {"feature": feature, "coeff": 4.0, "logits": _tensor(steered)},
        "clamp_logits": _tensor(clamped),
    }


def test_js_client_with_saes(npm_installed: str, sae_served: Served, tmp_path: Path) -> None:
    path = tmp_path / "reference.json"
    with torch.inference_mode():
        path.write_text(json.dumps(sae_reference(sae_served)))
    env = {"HOOKLAB_TEST_URL": sae_served.url, "HOOKLAB_TEST_REFERENCE": str(path)}
    run_node(npm_installed, [LIVE_SAE_TESTS], tmp_path, env)
