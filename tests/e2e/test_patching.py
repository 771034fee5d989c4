"""``hooklab.patching`` against TransformerLens 3.9's ``transformer_lens.patching`` on the same
weights and tokens: every ``get_act_patch_*`` function, with a server-side (declarative) metric
and with a Python callable run on the client, within 1e-4."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
import transformer_lens.patching as tl_patching

from hooklab import metrics, patching
from hooklab.errors import HooklabError

from .e2e_helpers import parse_frames, tensors_of
from .e2e_servers import Served, sample_tokens

FUNCTIONS = [
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_block_every",
]
ATOL = 1e-4
ANSWER, WRONG = [5, 7], [9, 11]


class Setup:
    """Clean and corrupted tokens (batch 2, 5 positions), both caches, a metric in two forms."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.clean = sample_tokens(served.tl, batch=2, pos=5, seed=1)
        self.corrupted = sample_tokens(served.tl, batch=2, pos=5, seed=2)
        _, self.tl_cache = served.tl.run_with_cache(self.clean)
        _, self.cache = served.model.run_with_cache(self.clean, store=True)
        self.declarative = metrics.logit_diff(ANSWER, WRONG)
        self.reference: dict[str, torch.Tensor] = {}

    def tl(self, name: str) -> torch.Tensor:
        """TransformerLens's result (memoised: both metric forms compute the same values)."""
        if name not in self.reference:
            function = getattr(tl_patching, name)
            self.reference[name] = function(
                self.served.tl, self.corrupted, self.tl_cache, logit_diff
            ).cpu()
        return self.reference[name]


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """A plain Python metric (what a TransformerLens notebook writes)."""
    rows = torch.arange(logits.shape[0])
    last = logits[:, -1]
    return (last[rows, ANSWER] - last[rows, WRONG]).mean()


_setups: dict[str, Setup] = {}


def setup_for(served: Served) -> Setup:
    if served.url not in _setups:
        _setups[served.url] = Setup(served)
    return _setups[served.url]


@pytest.fixture
def gpt2(gpt2_server: Served) -> Setup:
    return setup_for(gpt2_server)


@pytest.fixture
def llama(llama_server: Served) -> Setup:
    return setup_for(llama_server)


def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_declarative_metric_matches_tl(gpt2: Setup, name: str) -> None:
    function = getattr(patching, name)
    check(function(gpt2.served.model, gpt2.corrupted, gpt2.cache, gpt2.declarative), gpt2.tl(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_callable_metric_matches_tl(gpt2: Setup, name: str) -> None:
    function = getattr(patching, name)
    check(function(gpt2.served.model, gpt2.corrupted, gpt2.cache, logit_diff), gpt2.tl(name))


@pytest.mark.parametrize(
    "name",
    [
        "get_act_patch_attn_head_k_by_pos",
        "get_act_patch_attn_head_v_all_pos",
        "get_act_patch_attn_head_all_pos_every",
        "get_act_patch_attn_head_pattern_by_pos",
        "get_act_patch_block_every",
    ],
)
def test_grouped_query_attention_matches_tl(llama: Setup, name: str) -> None:
    """Llama with 2 key-value heads for 4 query heads: k/v results have 2 heads (TL pads them
    with zeros in the *_every functions)."""
    function = getattr(patching, name)
    model = llama.served.model
    check(function(model, llama.corrupted, llama.cache, llama.declarative), llama.tl(name))
    check(function(model, llama.corrupted, llama.cache, logit_diff), llama.tl(name))


def test_uploaded_client_cache(gpt2: Setup) -> None:
    """A client-side ActivationCache (no stored id) is uploaded and gives the same result."""
    model = gpt2.served.model
    _, cache = model.run_with_cache(gpt2.clean)
    assert cache.cache_id is None
    result = patching.get_act_patch_attn_head_out_all_pos(
        model, gpt2.corrupted, cache, gpt2.declarative
    )
    check(result, gpt2.tl("get_act_patch_attn_head_out_all_pos"))


@pytest.mark.parametrize(
    "metric",
    [
        metrics.logit(ANSWER),
        metrics.prob(ANSWER, pos=[3, 4]),
        metrics.logprob(7, pos=2, reduce="sum"),
        metrics.loss(),
    ],
    ids=["logit", "prob", "logprob", "loss"],
)
def test_metric_kinds(gpt2: Setup, metric: metrics.Metric) -> None:
    model, tl = gpt2.served.model, gpt2.served.tl
    local = metrics.loss(gpt2.corrupted) if metric.kind == "loss" else metric
    expected = tl_patching.get_act_patch_resid_pre(tl, gpt2.corrupted, gpt2.tl_cache, local)
    check(patching.get_act_patch_resid_pre(model, gpt2.corrupted, gpt2.cache, metric), expected)


def test_normalized_logit_diff(gpt2: Setup) -> None:
    """IOI-style: 0 at the corrupted run, 1 at the clean run; baselines measured by the server."""
    tl = gpt2.served.tl
    clean_value = logit_diff(tl(gpt2.clean)).item()
    corrupted_value = logit_diff(tl(gpt2.corrupted)).item()

    def normalized(logits: torch.Tensor) -> torch.Tensor:
        return (logit_diff(logits) - corrupted_value) / (clean_value - corrupted_value)

    expected = tl_patching.get_act_patch_attn_out(tl, gpt2.corrupted, gpt2.tl_cache, normalized)
    metric = metrics.logit_diff(ANSWER, WRONG, normalize=True)
    actual = patching.get_act_patch_attn_out(gpt2.served.model, gpt2.corrupted, gpt2.cache, metric)
    check(actual, expected)
    # resid_pre at layer 0, every position: the clean run itself.
    full = patching.generic_activation_patch(
        gpt2.served.model, gpt2.corrupted, gpt2.cache, metric,
        patching.layer_pos_patch_setter, "resid_pre", ["layer"],
    )  # fmt: skip
    assert abs(float(full[0]) - 1.0) < ATOL


def test_index_df_rows(gpt2: Setup) -> None:
    pandas = pytest.importorskip("pandas")
    index_df = pandas.DataFrame([[1, 2, 3], [0, 4, 0], [1, 0, 1]], columns=["layer", "pos", "head"])
    kwargs: dict[str, Any] = dict(
        patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
        activation_name="z",
        index_df=index_df,
        return_index_df=True,
    )
    expected, _ = tl_patching.generic_activation_patch(
        gpt2.served.tl, gpt2.corrupted, gpt2.tl_cache, logit_diff, **kwargs
    )
    actual, returned = patching.generic_activation_patch(
        gpt2.served.model, gpt2.corrupted, gpt2.cache.cache_id, gpt2.declarative, **kwargs
    )
    check(actual, expected.cpu())
    assert returned is index_df


def test_many_requests_and_small_batches(gpt2: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep split over several requests, one patched copy per forward, is unchanged."""
    monkeypatch.setattr(patching, "MIN_ROWS_PER_REQUEST", 7)
    name = "get_act_patch_attn_head_pattern_dest_src_pos"
    function: Callable[..., torch.Tensor] = getattr(patching, name)
    result = function(
        gpt2.served.model, gpt2.corrupted, gpt2.cache, gpt2.declarative, patches_per_forward=3
    )
    check(result, gpt2.tl(name))


def test_bad_requests(gpt2: Setup) -> None:
    model = gpt2.served.model
    with pytest.raises(TypeError, match="patch_setter"):
        patching.generic_activation_patch(
            model, gpt2.corrupted, gpt2.cache, logit_diff, lambda a, i, c: a, "z", ["layer"]
        )
    body = {
        "corrupted": [[1, 2, 3]],
        "clean": [[1, 2, 3]],
        "activation": "z",
        "axes": ["layer", "src_pos"],
        "metric": {"kind": "logit", "answer": 1},
    }
    with pytest.raises(HooklabError, match="src_pos"):
        model._transport.frames("POST", "/v1/patching", body)
    with pytest.raises(HooklabError, match=r"shape|batch"):
        model._transport.frames(
            "POST", "/v1/patching", {**body, "axes": ["layer"], "clean": [[1, 2]]}
        )


def test_a_python_metric_is_traced_and_runs_on_the_server(
    gpt2: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metric travels as a graph and only its values come back (no logits)."""
    transport = gpt2.served.model._transport
    sent: list[tuple[str, Any]] = []
    received: list[set[str]] = []
    frames = transport.frames

    def spy(method: str, path: str, body: Any = None, progress: bool = True) -> Any:
        meta, tensors = frames(method, path, body, progress)
        if path == "/v1/patching":
            sent.append((body["metric"]["kind"], body["metric"].get("positions")))
            received.append(set(tensors))
        return meta, tensors

    monkeypatch.setattr(transport, "frames", spy)
    result = patching.get_act_patch_resid_pre(
        gpt2.served.model, gpt2.corrupted, gpt2.cache, logit_diff
    )
    check(result, gpt2.tl("get_act_patch_resid_pre"))
    assert sent and all(kind == "graph" for kind, _ in sent)
    assert all(positions == [gpt2.corrupted.shape[1] - 1] for _, positions in sent)
    assert all(names == {"patching.metric"} for names in received)


@pytest.mark.parametrize("accept", ["application/json", "application/vnd.hooklab.frames+msgpack"])
@pytest.mark.parametrize("method", ["activation", "attribution"])
def test_the_metric_comes_back_shaped_as_the_sweep(gpt2: Setup, accept: str, method: str) -> None:
    """Over raw HTTP (another language's view): ``patching.metric`` is shaped as ``shape``
    ([layer, pos] for every combination), in JSON and in frames; the activation sweep's values
    are TransformerLens's; explicit index rows stay flat."""
    tl = gpt2.served.tl
    body = {
        "corrupted": gpt2.corrupted.tolist(), "clean": gpt2.clean.tolist(),
        "activation": "resid_pre", "axes": ["layer", "pos"], "method": method,
        "metric": {"kind": "logit_diff", "answer": ANSWER, "wrong": WRONG},
    }  # fmt: skip
    with httpx.Client(base_url=gpt2.served.url, timeout=60) as http:
        response = http.post("/v1/patching", json=body, headers={"accept": accept})
        assert response.status_code == 200, response.text
        explicit = http.post(
            "/v1/patching", json={**body, "index": [[1, 2], [0, 4]]}, headers={"accept": accept}
        )
    fields = response.json() if accept == "application/json" else parse_frames(response.content)[0]
    metric = tensors_of(response)["patching.metric"]
    assert fields["shape"] == [tl.cfg.n_layers, gpt2.corrupted.shape[1]]
    assert list(metric.shape) == fields["shape"]
    assert list(tensors_of(explicit)["patching.metric"].shape) == [2]
    if method == "activation":
        check(metric, gpt2.tl("get_act_patch_resid_pre"))
