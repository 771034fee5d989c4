"""A run_with_cache that returns its cache starts its response while the forward still runs:
each block's captures go out once the block has run, in both deployments (embedded, and a worker
streaming through Redis). A checkpoint deep and wide enough that its forward takes long enough
to watch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fixtures.checkpoints import build_checkpoint
from fixtures.served import ServeIn
from hooklab._transport import Transport
from hooklab.errors import DeadlineExceededError
from hooklab_proto import ControlFrame, StreamReader, TensorFrame

from .e2e_helpers import FRAMES, assert_close
from .e2e_servers import Served

LAYERS, BATCH, POS = 12, 8, 256
NAMES = [f"blocks.{layer}.hook_resid_pre" for layer in range(LAYERS)]


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("ckpt-deep")
    return build_checkpoint(
        "gpt2", folder, tokenizer_dir=tokenizer_dir, n_layer=LAYERS, n_embd=256, n_head=4,
        n_positions=POS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deep_server(serve_in: ServeIn, deep_checkpoint: Path) -> Iterator[Served]:
    with serve_in(deep_checkpoint, None) as served:
        yield served


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (BATCH, POS), generator=torch.Generator().manual_seed(3))


def _stream(
    served: Served, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    """(the end or error frame's fields, the tensors, when the first tensor frame arrived)."""
    reader, tensors, first_arrival = StreamReader(), {}, 0.0
    with (
        httpx.Client(base_url=served.url, timeout=120) as http,
        http.stream("POST", "/v1/run_with_cache", json=body, headers={"accept": FRAMES}) as r,
    ):
        assert r.status_code == 200, r.read()
        assert "content-length" not in r.headers  # the length is not known when it starts
        for chunk in r.iter_raw():
            for frame in reader.feed(chunk):
                if isinstance(frame, TensorFrame):
                    first_arrival = first_arrival or time.time()
                    tensors[frame.name] = frame.tensor.clone()
    reader.close()
    assert isinstance(reader.final, ControlFrame)
    return {"kind": reader.final.kind, **reader.final.fields}, tensors, first_arrival


def test_the_first_activation_arrives_before_the_forward_ends(deep_server: Served) -> None:
    tokens = _tokens(deep_server.tl.cfg.d_vocab)
    end, tensors, first_arrival = _stream(deep_server, {"input": tokens.tolist(), "names": NAMES})
    assert end["kind"] == "end"
    stats = end["stats"]
    assert stats["first_tensor_at"] < stats["forward_end_at"], stats
    assert first_arrival < stats["forward_end_at"], (first_arrival, stats)
    # What streamed is what TransformerLens 3.9 caches on the same weights.
    ref_logits, ref_cache = deep_server.tl.run_with_cache(tokens, names_filter=NAMES)
    assert set(tensors) == {*NAMES, "output.logits"}
    assert_close(tensors["output.logits"], ref_logits, "logits")
    for name in NAMES:
        assert_close(tensors[name], ref_cache[name], name)
    assert end.get("scheduler"), "the scheduler's stats travel in the end frame"


def test_a_deadline_passing_mid_stream_ends_it_with_an_error_frame(deep_server: Served) -> None:
    tokens = _tokens(deep_server.tl.cfg.d_vocab).tolist()
    end, _, _ = _stream(deep_server, {"input": tokens, "names": NAMES})
    forward_s = end["stats"]["forward_end_at"] - end["stats"]["first_tensor_at"]
    # Due after the first block's captures went out and well before the last block.
    body = {"input": tokens, "names": NAMES, "timeout_s": forward_s / 2}
    end, tensors, _ = _stream(deep_server, body)
    assert end["kind"] == "error" and end["code"] == "deadline_exceeded", end
    assert 0 < len(tensors) < len(NAMES) + 1
    # The client raises the typed error, as for one answered before the response started.
    transport = Transport(deep_server.url)
    with pytest.raises(DeadlineExceededError, match="deadline"):
        transport.frames("POST", "/v1/run_with_cache", body, progress=False)
    transport.close()
