"""The teaching page (issue 16) in headless Chromium, checked against the JSON API and against
TransformerLens on the same weights: the top-1 token, a logit-lens cell, direct logit
attribution, an attention weight, a head ablation; the steering playground's streams and their
cancellation; keys, quotas and validation errors said in words.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from e2e.e2e_servers import Served, serve
from hostile.server_process import Metrics

from fixtures.redis_server import running_redis
from fixtures.scaled_out import ScaledOut
from hooklab_server.auth import KeyRecord, new_key, write_keys
from hooklab_server.engine import load_model
from hooklab_server.settings import Settings

from .conftest import PageErrors

PROMPT = "The license of this file is"
LAYER, HEAD, QUERY, KEY = 1, 2, 5, 3  # the attention weight and the head the tests look at
TOLERANCE = 1e-5
MINUS = "\u2212"  # the page prints a real minus sign


# ---- what the page shows, computed as the page's code does --------------------------------------


def shown(text: str) -> str:
    """model.js's shown(): whitespace made visible."""
    return text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def percent(p: float) -> str:
    """charts.js's percent()."""
    return f"{p * 100:.0f}%" if p >= 0.995 else f"{p * 100:.1f}%"


def signed(value: float, digits: int = 2) -> str:
    """charts.js's signed(): a real minus sign."""
    sign = MINUS if value < 0 else "+"
    return f"{sign}{abs(value):.{digits}f}"


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    """TransformerLens's reference numbers need no autograd graph."""
    with torch.no_grad():
        yield


# ---- the JSON API, as curl would call it -------------------------------------------------------


@pytest.fixture
def http(ui_server: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ui_server.url, timeout=60) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tensor(answer: dict[str, Any], name: str) -> torch.Tensor:
    return torch.tensor(answer["tensors"][name]["data"], dtype=torch.float64)


def run_page(page: Any, url: str, prompt: str = PROMPT) -> list[int]:
    """Opens the page, runs the prompt, waits for every view; the token ids it shows."""
    page.goto(url + "/")
    page.wait_for_selector("#run:not([disabled])")
    page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_selector('body[data-runs="1"]', state="attached")
    ids: list[int] = page.eval_on_selector_all(
        "#tokens .chip", "chips => chips.map(chip => Number(chip.dataset.tokenId))"
    )
    return ids


def pair_of(page: Any) -> tuple[int, int]:
    """The answer pair the page chose (the two likeliest next tokens)."""
    answer = page.get_attribute("#answer", "data-token-id")
    wrong = page.get_attribute("#wrong", "data-token-id")
    return int(answer), int(wrong)


def value(page: Any, selector: str, attribute: str = "data-value") -> float:
    return float(page.get_attribute(selector, attribute))


# ---- the tests ---------------------------------------------------------------------------------


def test_views_match_the_json_api_and_transformer_lens(
    page: Any, ui_server: Served, http: httpx.Client, screenshots: Path
) -> None:
    ids = run_page(page, ui_server.url)
    tokenized = post(http, "/v1/tokenize", {"input": PROMPT})
    assert ids == tokenized["tokens"][0]
    tokens = torch.tensor([ids])
    tl = ui_server.tl
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    page.screenshot(path=screenshots / "lens.png", full_page=True)

    # The top-1 next token: /v1/forward's logits, and TransformerLens's.
    logits = tensor(post(http, "/v1/forward", {"input": PROMPT}), "output.logits")[0, -1]
    probs = logits.softmax(-1)
    top = page.locator("#topk li").first
    top_id = int(top.get_attribute("data-token-id"))
    assert top_id == int(probs.argmax()) == int(tl_logits[0, -1].argmax())
    assert float(top.get_attribute("data-prob")) == pytest.approx(float(probs.max()), abs=1e-6)
    [text] = post(http, "/v1/detokenize", {"tokens": [[top_id]]})["text"]
    assert top.locator(".token").inner_text() == shown(text)
    assert top.locator(".prob").inner_text() == percent(float(probs.max()))

    # One logit-lens cell: the JSON API's accumulated_resid(apply_ln=True) on a stored cache,
    # unembedded with /v1/weights' W_U and b_U; and TransformerLens's.
    cache_id = post(http, "/v1/run_with_cache", {"input": PROMPT, "lazy": True})["cache_id"]
    stack = post(
        http,
        "/v1/analysis",
        {"cache": cache_id, "method": "accumulated_resid", "args": {"apply_ln": True}, "rows": 0},
    )
    w_u = tensor(http.get("/v1/weights/W_U").json(), "W_U")
    b_u = tensor(http.get("/v1/weights/b_U").json(), "b_U")
    lens_probs = (tensor(stack, "analysis.result") @ w_u + b_u).softmax(-1)  # [layer, pos, vocab]
    tl_lens = (tl_cache.accumulated_resid(apply_ln=True)[:, 0] @ tl.W_U + tl.b_U).softmax(-1)
    for layer, pos in [(1, 3), (0, len(ids) - 1), (2, len(ids) - 1)]:
        cell = f'#lens-heatmap td[data-layer="{layer}"][data-pos="{pos}"]'
        shown_prob = value(page, cell, "data-prob")
        assert shown_prob == pytest.approx(float(lens_probs[layer, pos].max()), abs=TOLERANCE)
        assert shown_prob == pytest.approx(float(tl_lens[layer, pos].max()), abs=TOLERANCE)
        cell_id = int(page.get_attribute(cell, "data-token-id"))
        assert cell_id == int(lens_probs[layer, pos].argmax()) == int(tl_lens[layer, pos].argmax())
        [cell_text] = post(http, "/v1/detokenize", {"tokens": [[cell_id]]})["text"]
        assert page.inner_text(cell) == f"{shown(cell_text)} {percent(shown_prob)}"

    # The answer pair's logit difference after the last layer is the model's own.
    answer, wrong = pair_of(page)
    final = '#lens-diff .bar-row[data-layer="2"]'
    assert value(page, final) == pytest.approx(float(logits[answer] - logits[wrong]), abs=1e-4)

    # Direct logit attribution: decompose_resid and stack_head_results through logit_attrs, run
    # by the Python client on a cache kept on the server (POST /v1/analysis), and in TL.
    _, cache = ui_server.model.run_with_cache(tokens, lazy=True)
    layers = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), answer, wrong, pos_slice=-1)
    heads = cache.logit_attrs(cache.stack_head_results(pos_slice=-1), answer, wrong, pos_slice=-1)
    tl_layers = tl_cache.logit_attrs(
        tl_cache.decompose_resid(pos_slice=-1), answer, wrong, pos_slice=-1
    )
    tl_heads = tl_cache.logit_attrs(
        tl_cache.stack_head_results(pos_slice=-1), answer, wrong, pos_slice=-1
    )
    page.click("#tab-dla")
    page.screenshot(path=screenshots / "attribution.png", full_page=True)
    bar = '#dla .bar-row[data-component="1_attn_out"]'
    component = 4  # embed, pos_embed, 0_attn_out, 0_mlp_out, 1_attn_out, …
    assert value(page, bar) == pytest.approx(float(layers[component, 0]), abs=1e-4)
    assert value(page, bar) == pytest.approx(float(tl_layers[component, 0]), abs=1e-4)
    assert page.inner_text(f"{bar} .bar-value") == signed(float(layers[component, 0]))
    head_cell = f'#dla td[data-layer="{LAYER}"][data-head="{HEAD}"]'
    n_heads = tl.cfg.n_heads
    assert value(page, head_cell) == pytest.approx(
        float(heads[LAYER * n_heads + HEAD, 0]), abs=1e-4
    )
    assert value(page, head_cell) == pytest.approx(
        float(tl_heads[LAYER * n_heads + HEAD, 0]), abs=1e-4
    )

    # One attention weight: run_with_cache's blocks.L.attn.hook_pattern, and TL's.
    page.click("#tab-attention")
    page.select_option("#attn-layer", str(LAYER))
    page.select_option("#attn-head", str(HEAD))
    page.wait_for_selector(f"#attn-pattern caption:has-text('Layer {LAYER}, head {HEAD}')")
    name = f"blocks.{LAYER}.attn.hook_pattern"
    pattern = tensor(
        post(http, "/v1/run_with_cache", {"input": PROMPT, "names": [name], "return_type": None}),
        name,
    )
    weight = value(page, f'#attn-pattern td[data-query="{QUERY}"][data-key="{KEY}"]', "data-weight")
    assert weight == pytest.approx(float(pattern[0, HEAD, QUERY, KEY]), abs=TOLERANCE)
    assert weight == pytest.approx(float(tl_cache["pattern", LAYER][0, HEAD, QUERY, KEY]), abs=1e-5)
    assert page.locator("#attn-grid button.multiple").count() == n_heads
    page.screenshot(path=screenshots / "attention.png", full_page=True)

    for tab in ("ablation", "steering"):
        page.click(f"#tab-{tab}")
        page.screenshot(path=screenshots / f"{tab}.png", full_page=True)
    assert len(list(screenshots.glob("*.png"))) == 5


def test_ablating_a_head_matches_run_with_hooks(
    page: Any, ui_server: Served, http: httpx.Client, screenshots: Path
) -> None:
    ids = run_page(page, ui_server.url)
    answer, wrong = pair_of(page)
    page.click("#tab-ablation")
    page.click(f'button[data-head="{LAYER}.{HEAD}"]')
    page.wait_for_selector(f'#ablation-result[data-heads="{LAYER}.{HEAD}"]', state="attached")
    assert page.get_attribute(f'button[data-head="{LAYER}.{HEAD}"]', "aria-pressed") == "true"
    page.screenshot(path=screenshots / "ablation.png", full_page=True)

    spec = {"hook": f"blocks.{LAYER}.attn.hook_z", "op": "ablate", "mode": "zero", "head": [HEAD]}
    hooked = tensor(
        post(http, "/v1/run_with_hooks", {"input": PROMPT, "hooks": [spec]}), "output.logits"
    )
    clean = tensor(post(http, "/v1/forward", {"input": PROMPT}), "output.logits")

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, HEAD] = 0.0
        return z

    tl_hooked = ui_server.tl.run_with_hooks(
        torch.tensor([ids]), fwd_hooks=[(f"blocks.{LAYER}.attn.hook_z", zero_head)]
    )
    ablated = value(page, "#ablated-diff")
    assert ablated == pytest.approx(float(hooked[0, -1, answer] - hooked[0, -1, wrong]), abs=1e-4)
    assert ablated == pytest.approx(
        float(tl_hooked[0, -1, answer] - tl_hooked[0, -1, wrong]), abs=1e-4
    )
    assert page.inner_text("#ablated-diff") == signed(ablated, 4)
    assert value(page, "#clean-diff") == pytest.approx(
        float(clean[0, -1, answer] - clean[0, -1, wrong]), abs=1e-4
    )
    assert ablated != pytest.approx(value(page, "#clean-diff"), abs=1e-6)

    # Clicking the head again restores it: the difference is the clean one again.
    page.click(f'button[data-head="{LAYER}.{HEAD}"]')
    page.wait_for_selector('#ablation-result[data-heads=""]', state="attached")
    assert value(page, "#ablated-diff") == pytest.approx(value(page, "#clean-diff"), abs=1e-6)


def generated(page: Any, selector: str) -> str:
    return str(
        page.eval_on_selector_all(
            f"{selector} .new-token", "s => s.map(t => t.textContent).join('')"
        )
    )


def cancelled(http: httpx.Client) -> float:
    return Metrics(http.get("/metrics").text).value("hooklab_generations_cancelled_total") or 0.0


def test_steering_streams_side_by_side_and_stops(
    page: Any, ui_server: Served, http: httpx.Client, screenshots: Path
) -> None:
    page.goto(ui_server.url + "/")
    page.click("#tab-steering")
    page.wait_for_selector("#gen-start:not([disabled])")
    page.select_option("#steer-layer", "1")
    page.fill("#steer-coeff", "20")
    page.fill("#gen-tokens", "24")
    page.fill("#gen-temperature", "0")
    page.uncheck("#gen-eos")
    page.click("#gen-start")
    page.wait_for_selector('#gen-plain[data-state="done"]', state="attached")
    page.wait_for_selector('#gen-steered[data-state="done"]', state="attached")
    assert float(page.get_attribute("#steer-info", "data-norm")) > 0
    plain, steered = generated(page, "#gen-plain"), generated(page, "#gen-steered")
    assert page.get_attribute("#gen-plain", "data-tokens") == "24"
    assert page.get_attribute("#gen-steered", "data-tokens") == "24"
    assert plain and steered and plain != steered
    # The unsteered column is the server's greedy generation, token for token.
    expected = post(
        http,
        "/v1/generate",
        {"input": "I think that you are", "max_new_tokens": 24, "do_sample": False,
         "stop_at_eos": False, "seed": 0},
    )  # fmt: skip
    assert expected["text"][0] == "I think that you are" + plain
    page.screenshot(path=screenshots / "steering.png", full_page=True)

    # A long generation, stopped while it streams: the server stops both generations.
    before = cancelled(http)
    page.fill("#gen-tokens", "1000")
    page.click("#gen-start")
    page.wait_for_function(
        "() => ['gen-plain', 'gen-steered'].every(id => {"
        " const out = document.getElementById(id);"
        " return out.dataset.state === 'streaming' && Number(out.dataset.tokens) >= 3; })"
    )
    page.click("#gen-stop")
    page.wait_for_selector('#gen-plain[data-state="stopped"]', state="attached")
    page.wait_for_selector('#gen-steered[data-state="stopped"]', state="attached")
    assert int(page.get_attribute("#gen-plain", "data-tokens")) < 1000
    deadline = time.monotonic() + 15
    while cancelled(http) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled(http) == before + 2
    assert "(stopped)" in page.inner_text("#gen-plain-progress")
    assert page.is_hidden("#error")
    page.screenshot(path=screenshots / "steering-stopped.png", full_page=True)


# ---- a shared server: keys, quotas, errors in words ---------------------------------------------


@pytest.fixture
def keyed_server(ui_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A server with keys (a student's key allows 5 new tokens per generate): (url, key)."""
    key_id, key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()  # what the keys file keeps
    record = KeyRecord("student-07", key_id, digest, False, {"max_new_tokens": 5}, "2026-01-01")
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, [record])
    model = load_model(str(ui_checkpoint), device="cpu")
    with serve(model, Settings(keys_file=str(keys_file))) as running:
        yield running.url, key


def test_keys_quotas_and_validation_errors_are_said_in_words(
    page: Any, page_errors: PageErrors, keyed_server: tuple[str, str], screenshots: Path
) -> None:
    url, key = keyed_server
    page_errors.allow_http_errors = True  # 401, 429 and 422 answers are what this test asks for
    page.goto(url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert "needs your API key" in page.inner_text("#key-reason")
    page.screenshot(path=screenshots / "key-asked.png", full_page=True)
    page.click("#key-dialog button[value=cancel]")
    page.wait_for_selector('#error[data-code="unauthorized"]')

    # A wrong key: the server's refusal, in words, and the dialog again.
    page.click("#key-button")
    page.fill("#key-input", "hl_wrongkey_notreallyakeyatall")
    page.click("#key-save")
    page.wait_for_selector("#key-reason:has-text('refused')")
    assert "not one of this server's" in page.inner_text("#key-reason")
    assert "not one of this server's" in page.inner_text("#error")
    page.screenshot(path=screenshots / "key-refused.png", full_page=True)

    # The right key: kept in local storage, the models load, the page runs.
    page.fill("#key-input", key)
    page.click("#key-save")
    page.wait_for_selector("#run:not([disabled])")
    assert page.evaluate("localStorage.getItem('hooklab.apiKey')") == key
    page.wait_for_selector("#usage:has-text('student-07')")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector('body[data-runs="1"]', state="attached")
    assert page.locator("#topk li").count() == 10

    # Over the key's max_new_tokens quota: 429 said as a quota problem, naming the quota.
    page.click("#tab-steering")
    page.fill("#gen-tokens", "30")
    page.click("#gen-start")
    page.wait_for_selector('#error[data-code="quota"]')
    text = page.inner_text("#error")
    assert "over one of its quotas" in text and "max_new_tokens" in text
    page.screenshot(path=screenshots / "quota.png", full_page=True)

    # A field the server refuses (a negative seed): 422, naming the field.
    page.fill("#gen-tokens", "4")
    page.fill("#gen-seed", "-1")
    page.click("#gen-start")
    page.wait_for_selector('#error[data-code="validation_error"]')
    assert "seed" in page.inner_text("#error")

    # A reload keeps the key: no dialog, the page is ready.
    page.reload()
    page.wait_for_selector("#run:not([disabled])")
    assert page.is_hidden("#key-dialog")


# ---- any served model: the picker --------------------------------------------------------------


@pytest.fixture
def two_models(ui_checkpoint: Path, llama_checkpoint: Path, tmp_path: Path) -> Iterator[str]:
    """Two models served scaled out (a redis-server, one worker each): the API's url."""
    (tmp_path / "redis").mkdir()
    with running_redis(tmp_path / "redis") as redis_server:
        deployment = ScaledOut(
            redis_server.url, [ui_checkpoint, llama_checkpoint], tmp_path, workers=1
        )
        try:
            yield deployment.start().url
        finally:
            deployment.stop()


def test_the_model_picker_runs_any_served_model(
    page: Any, two_models: str, llama_checkpoint: Path, screenshots: Path
) -> None:
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.post_data_json)
            if request.method == "POST" and "/v1/" in request.url
            else None
        ),
    )
    page.goto(two_models + "/")
    page.wait_for_selector("#run:not([disabled])")
    names = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert sorted(names) == sorted(["ckpt-page0", llama_checkpoint.name])  # GET /v1/models
    page.select_option("#model", llama_checkpoint.name)
    page.wait_for_selector("#model-info:has-text('2 layers · 4 heads')")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector('body[data-runs="1"]', state="attached")
    page.screenshot(path=screenshots / "picked-model.png", full_page=True)
    assert sent and all(body["model"] == llama_checkpoint.name for body in sent)

    with httpx.Client(base_url=two_models, timeout=60) as http:
        body = {"model": llama_checkpoint.name, "input": PROMPT}
        logits = tensor(post(http, "/v1/forward", body), "output.logits")[0, -1]
    top = page.locator("#topk li").first
    assert int(top.get_attribute("data-token-id")) == int(logits.argmax())
    assert float(top.get_attribute("data-prob")) == pytest.approx(
        float(logits.softmax(-1).max()), abs=1e-5
    )
    # The choice is remembered for the next visit.
    page.reload()
    page.wait_for_selector("#run:not([disabled])")
    assert page.input_value("#model") == llama_checkpoint.name
