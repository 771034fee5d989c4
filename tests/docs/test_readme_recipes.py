"""Every curl recipe of the documentation, run as written against a live server, so the docs
cannot rot: a recipe that stops working fails this suite.

A recipe is a shell code block (```bash, ```sh, ```shell, ```console) of README.md or
proto/README.md that calls curl. Each runs in bash as one script (shell variables carry from one
command to the next), after the file's setup blocks (those that set ``HOOKLAB`` without calling
curl), with ``HOOKLAB`` pointing at the test's server and ``HOOKLAB_API_KEY`` empty (the server
is open), under ``set -euo pipefail`` and with every curl failing on an HTTP error status. It
must exit 0 and print JSON values, server-sent events that end as a success, or (``/metrics``)
Prometheus text.

Blocks that deploy (a command line starting with docker, hooklab-server, hooklab-worker,
redis-server or make) are instructions, not recipes. A recipe written for the default model
(SmolLM2-135M: d_model 576, 30 layers) runs on the fixture model with its sizes: its d_model
for 576, its last layer for a block it lacks; ``localhost:8000`` and ``127.0.0.1:8000`` become
the test server's address. The server: the GPT-2 fixture with a chat template, embedded and
scaled out over Redis (``docs_server``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from e2e.e2e_servers import Served, engine_model, serve

from hooklab_server.auth import KeyRecord, new_key, write_keys
from hooklab_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "proto/README.md")
SHELLS = frozenset({"bash", "sh", "shell", "console"})
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
DEPLOYS = re.compile(
    r"^\s*(?:docker|hooklab-server|hooklab-worker|redis-server|make)\b", re.MULTILINE
)
SETS_HOOKLAB = re.compile(r"^(?:export )?HOOKLAB=", re.MULTILINE)
DEFAULT_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
DEFAULT_D_MODEL = re.compile(r"\b576\b")  # SmolLM2-135M's
BLOCK_INDEX = re.compile(r"\bblocks\.(\d+)\.")
RECIPE_TIMEOUT_S = 60

# Every curl adds --fail-with-body unless the recipe asks for -f itself (curl refuses both):
# a recipe that gets an error status fails even when it forgot to say so.
CURL_FAILS = """\
curl() {
  local arg
  for arg in "$@"; do
    case $arg in
      --fail | --fail-with-body) command curl "$@"; return ;;
      --*) ;;
      -*f*) command curl "$@"; return ;;
    esac
  done
  command curl --fail-with-body "$@"
}"""

# The route families the recipes must show between them (so a recipe that is dropped, or a
# fence the extraction misses, fails here too).
FAMILIES = (
    "/v1/model ", "/v1/models", "/v1/tokenize", "/v1/detokenize", "/v1/weights/",
    "/openapi.json", "/v1/forward", '"return_type": "loss"', '"return_type": null',
    "/v1/run_with_cache", "/v1/run_with_hooks", '"op": "steer"', "/v1/tensors",
    '{"ref": ', "-X DELETE", '"lazy": true', "/v1/caches/", "/v1/analysis", "/v1/generate",
    '"stream": true', "/v1/patching", "/v1/integrated_gradients", "/v1/completions",
    "/v1/chat/completions", "/v1/usage", "/v1/capabilities", "/metrics", "/healthz", "/readyz",
    "application/vnd.hooklab.frames+msgpack", "/v1/saes",
)  # fmt: skip


@dataclass(frozen=True)
class Block:
    doc: str  # the file, relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str  # the commands (a console block's prompts stripped, its output left out)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _commands(lang: str, body: str) -> str:
    """The shell text of a block: a console block's ``$ `` lines and their continuations."""
    if lang != "console":
        return body
    lines, continued = [], False
    for line in body.splitlines():
        if line.startswith("$ ") or continued:
            lines.append(line[2:] if line.startswith("$ ") and not continued else line)
            continued = line.endswith("\\")
    return "\n".join(lines) + "\n"


def shell_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    return [
        Block(doc, text.count("\n", 0, match.start()) + 1, match[1], _commands(match[1], match[2]))
        for match in FENCE.finditer(text)
        if match[1] in SHELLS
    ]


def _is_recipe(block: Block) -> bool:
    return "curl" in block.text and not DEPLOYS.search(block.text)


def _is_setup(block: Block) -> bool:
    return "curl" not in block.text and SETS_HOOKLAB.search(block.text) is not None


BLOCKS = [block for doc in DOCS for block in shell_blocks(doc)]
RECIPES = [block for block in BLOCKS if _is_recipe(block)]


def _setup(doc: str) -> list[str]:
    return [block.text for block in BLOCKS if block.doc == doc and _is_setup(block)]


# --- what a recipe prints ----------------------------------------------------------------------


def _json_values(text: str) -> list[Any]:
    """The JSON values ``text`` holds one after another (as jq prints them); raises if any part
    is not JSON."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not JSON at character {at}: {exc}") from None
        values.append(value)


def _check_events(text: str) -> None:
    """Server-sent events, every data a JSON object (or OpenAI's ``[DONE]``), ending as a
    success: a ``done`` event or ``[DONE]`` (an ``error`` event comes with status 200)."""
    event, last, data = "message", None, 0
    for line in text.splitlines():
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data += 1
            if value != "[DONE]":
                payload = json.loads(value)
                assert "error" not in payload, f"the stream failed: {value}"
            last = "[DONE]" if value == "[DONE]" else event
            assert event != "error", f"the stream failed: {value}"
        else:
            raise AssertionError(f"not a server-sent event line: {line!r}")
    assert data, "no events"
    assert last in ("done", "[DONE]"), f"the stream ended without success (last: {last!r})"


PROMETHEUS_SAMPLE = re.compile(r"^[A-Za-z_:][\w:]*(\{.*\})? \S+( \d+)?$")


def _check_prometheus(text: str) -> None:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines, "no samples"
    for line in lines:
        assert PROMETHEUS_SAMPLE.match(line), f"not a Prometheus sample: {line!r}"


def check_output(block: Block, text: str) -> None:
    if re.search(r"^(?:event|data):", text, re.MULTILINE):
        _check_events(text)
    elif re.search(r"/metrics\b", block.text):
        _check_prometheus(text)
    else:
        assert _json_values(text), "the recipe printed nothing"


# --- running one -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    d_model: int
    n_layers: int


def model_sizes(url: str, key: str = "") -> Sizes:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    cfg = httpx.get(f"{url}/v1/model", headers=headers, timeout=30).json()["cfg"]
    return Sizes(int(cfg["d_model"]), int(cfg["n_layers"]))


@pytest.fixture(scope="module")
def sizes(docs_server: Served) -> Sizes:
    return model_sizes(docs_server.url)


def adapted(text: str, address: str, sizes: Sizes) -> str:
    """The recipe for the test's server and model (see the module's docstring)."""
    text = DEFAULT_ADDRESS.sub(address, text)
    text = DEFAULT_D_MODEL.sub(str(sizes.d_model), text)
    return BLOCK_INDEX.sub(lambda m: f"blocks.{min(int(m[1]), sizes.n_layers - 1)}.", text)


def _environment(url: str, key: str) -> dict[str, str]:
    proxies = {"http_proxy", "https_proxy", "all_proxy"}
    env = {name: value for name, value in os.environ.items() if name.lower() not in proxies}
    return {**env, "HOOKLAB": url, "HOOKLAB_API_KEY": key, "NO_PROXY": "127.0.0.1,localhost"}


def run_recipe(
    recipe: Block, url: str, sizes: Sizes, folder: Path, key: str = ""
) -> tuple[subprocess.CompletedProcess[str], str]:
    """The recipe's run in bash (after its file's setup blocks), and a report of it."""
    for tool in ("curl", "jq"):
        if re.search(rf"\b{tool}\b", recipe.text) and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    address = urlsplit(url).netloc
    script = "\n".join(
        [
            "set -euo pipefail",
            CURL_FAILS,
            *(adapted(text, address, sizes) for text in _setup(recipe.doc)),
            f"HOOKLAB={shlex.quote(url)}",
            adapted(recipe.text, address, sizes),
        ]
    )
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env=_environment(url, key),
        timeout=RECIPE_TIMEOUT_S,
        cwd=folder,  # where a recipe writes, if it does
    )
    report = (
        f"{recipe.id} exited {done.returncode}\n--- script\n{script}"
        f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
    return done, report


def test_the_recipes_show_every_route_family() -> None:
    recipes = "\n".join(block.text for block in RECIPES)
    missing = [family for family in FAMILIES if family not in recipes]
    assert not missing, f"no recipe shows {missing}"
    assert _setup("README.md"), "README.md has no setup block (HOOKLAB=…)"


def write_example_sae(folder: Path, sizes: Sizes) -> None:
    """``my-sae/``, the SAELens folder the upload recipe sends: a random SAE reading the last
    block's residual (what the recipe's blocks.29 becomes)."""
    import torch
    from safetensors.torch import save_file

    d_in, d_sae = sizes.d_model, 16
    (folder / "my-sae").mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    save_file(tensors, folder / "my-sae" / "sae_weights.safetensors")
    hook = f"blocks.{sizes.n_layers - 1}.hook_resid_post"
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": hook}
    (folder / "my-sae" / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.id for recipe in RECIPES])
def test_recipe_runs(recipe: Block, docs_server: Served, sizes: Sizes, tmp_path: Path) -> None:
    if "my-sae/" in recipe.text:
        write_example_sae(tmp_path, sizes)
    done, report = run_recipe(recipe, docs_server.url, sizes, tmp_path)
    assert done.returncode == 0, report
    try:
        check_output(recipe, done.stdout)
    except (AssertionError, json.JSONDecodeError) as exc:
        raise AssertionError(f"{exc}\n{report}") from None


def test_the_recipes_send_hooklab_api_key(docs_checkpoint: Path, tmp_path: Path) -> None:
    """On a server with keys, a recipe works with HOOKLAB_API_KEY set, and is refused (401)
    without it: the setup block's options carry the key. (The stored-tensor recipe: a store,
    a reference, a listing and a delete, each under the key.)"""
    [recipe] = [block for block in RECIPES if "-X DELETE $HOOKLAB/v1/tensors/" in block.text]
    key_id, key = new_key()
    record = KeyRecord("docs", key_id, hashlib.sha256(key.encode()).hexdigest(), False, {}, "")
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, [record])
    with serve(engine_model(docs_checkpoint), Settings(keys_file=str(keys_file))) as running:
        sizes = model_sizes(running.url, key)
        done, report = run_recipe(recipe, running.url, sizes, tmp_path, key)
        assert done.returncode == 0, report
        check_output(recipe, done.stdout)
        refused, report = run_recipe(recipe, running.url, sizes, tmp_path)
    assert refused.returncode != 0, report
    assert "returned error: 401" in refused.stderr, report
