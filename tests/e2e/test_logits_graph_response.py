"""A forward with a ``logits_graph`` answers the graph's result instead of the logits, so its
response is sized by that result: a JSON forward whose logits would pass
``max_json_response_bytes`` is refused, while the same forward reduced by a graph to one value per
row is answered (the teaching page's logit lens asks for [rows, pos, 21] values of a
[rows, pos, d_vocab] forward this way)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import torch

from .e2e_servers import Served

PROMPTS = ["def f(x): return x + 1"] * 4
LAST_POSITION_LOGIT = {
    "graph_v": 1,
    "opset": "hooklab-ops/1",
    "input": {"shape": [None, None, None], "dtype": "F32"},
    "consts": [],
    "nodes": [
        {
            "op": "getitem",
            "args": {"self": {"in": 0}, "index": [{"slice": [None, None, None]}, -1, 7]},
        }
    ],
    "output": {"n": 0},
}


def test_a_json_answer_is_sized_by_the_logits_graph(make_server: Callable[..., Served]) -> None:
    served = make_server(max_json_response_bytes=50_000)  # the logits are ~800 kB of JSON
    with httpx.Client(base_url=served.url, timeout=60) as http:
        refused = http.post("/v1/forward", json={"input": PROMPTS})
        assert refused.status_code == 413, refused.text
        assert "max_json_response_bytes" in refused.json()["error"]["message"]

        answered = http.post(
            "/v1/forward", json={"input": PROMPTS, "logits_graph": LAST_POSITION_LOGIT}
        )
        assert answered.status_code == 200, answered.text
        value = answered.json()["tensors"]["output.value"]
        assert value["shape"] == [len(PROMPTS)]
    with torch.no_grad():
        expected = served.tl(served.model.to_tokens(PROMPTS))[:, -1, 7]
    assert torch.tensor(value["data"]) == pytest.approx(expected, abs=1e-4)
