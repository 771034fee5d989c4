"""The optional torch.compile of the no-hook path (issue 18, ``engine/compiled.py``).

Compiled == eager: logits within 1e-5 and greedy generation token for token (solo and in a
decode pool; with the decode steps compiled too on the Llama checkpoint), on GPT-2 and on a
Llama checkpoint with grouped-query attention. A layer that a hook or a capture touches runs
eagerly (the hook fires, the run equals the eager hooked run), and a compiled model's
``run_with_cache`` equals TransformerLens 3.9.

Compiles are made lazily here (no start-up warm-up) and dynamo fails loudly rather than falling
back to eager when a graph would be compiled too often, so a test cannot pass on the eager path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    as_dict,
    assert_caches_close,
    is_gqa,
    our_model,
    sample_tokens,
    tl_model,
)

from hooklab_server.engine.compiled import CompiledBlocks, compiler_available, enable_compile
from hooklab_server.engine.decode_pool import DecodePool

pytestmark = [
    pytest.mark.skipif(
        not compiler_available(), reason="torch.compile (inductor) needs a C++ compiler"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]

COMPILED_ATOL = 1e-5
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def loud_dynamo() -> Iterator[None]:
    """Fresh dynamo caches; hitting the recompile limit is an error, not a silent eager run."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(params=["gpt2", "llama"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(f"{request.param}_checkpoint")
    if request.param == "llama":
        assert is_gqa(path)  # the fixture covers grouped-query attention
    return path


class Counting:
    """Counts the blocks a model ran compiled (calls into its ``CompiledBlocks``)."""

    def __init__(self, compiled: CompiledBlocks) -> None:
        self.compiled, self.calls = compiled, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.compiled(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)


def compiled_model(checkpoint: Path, decode: bool | None = None) -> tuple[Any, Counting]:
    """The session's engine model with compile switched on (restored by ``eager_after``);
    ``decode``: as ``enable_compile`` (None: decode steps compile on CUDA only)."""
    model = our_model(checkpoint)
    enable_compile(model, warm=False, decode=decode)
    assert model.compiled is not None
    counting = Counting(model.compiled)
    model.compiled = counting
    return model, counting


@pytest.fixture
def eager_after() -> Iterator[list[Any]]:
    """Models put here run eagerly again after the test (the session shares them)."""
    models: list[Any] = []
    yield models
    for model in models:
        model.compiled = None


def greedy(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    return model.generate(
        tokens, max_new_tokens=NEW_TOKENS, do_sample=False, stop_at_eos=False, verbose=False
    )


def pool_greedy(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    pool = DecodePool(model, max_rows=4, max_positions=64)
    group, logits = pool.join(tokens)
    chosen = [logits.argmax(-1)]
    for _ in range(NEW_TOKENS - 1):
        chosen.append(pool.step({group: chosen[-1]})[group].argmax(-1))
    return torch.stack(chosen, dim=1)


def test_compiled_equals_eager(checkpoint: Path, eager_after: list[Any]) -> None:
    """The CPU default: forwards and prefills compiled, decode steps eager."""
    tokens = sample_tokens(checkpoint)
    model = our_model(checkpoint)
    logits = model(tokens)
    tokens_out, pooled = greedy(model, tokens), pool_greedy(model, tokens)

    model, counting = compiled_model(checkpoint)
    eager_after.append(model)
    compiled_logits = model(tokens)
    assert counting.calls == model.cfg.n_layers
    diff = float((compiled_logits - logits).abs().max())
    assert diff <= COMPILED_ATOL, f"compiled logits differ from eager by {diff:.3g}"
    assert torch.equal(greedy(model, tokens), tokens_out)
    assert torch.equal(pool_greedy(model, tokens), pooled)
    assert counting.calls == 3 * model.cfg.n_layers  # the forward and the two prefills


def test_compiled_decode_steps_equal_eager(llama_checkpoint: Path, eager_after: list[Any]) -> None:
    """Decode steps compiled too (the default on CUDA), solo and pooled, with rotary and
    grouped-query attention (the GPT-2 steps take the same code without them)."""
    tokens = sample_tokens(llama_checkpoint)
    model = our_model(llama_checkpoint)
    tokens_out, pooled = greedy(model, tokens), pool_greedy(model, tokens)

    model, counting = compiled_model(llama_checkpoint, decode=True)
    eager_after.append(model)
    assert torch.equal(greedy(model, tokens), tokens_out)
    assert counting.calls == NEW_TOKENS * model.cfg.n_layers  # prefill + cached steps
    assert torch.equal(pool_greedy(model, tokens), pooled)
    assert counting.calls == 2 * NEW_TOKENS * model.cfg.n_layers  # + prefill and pool steps


def test_a_hooked_layer_runs_eagerly(gpt2_checkpoint: Path, eager_after: list[Any]) -> None:
    tokens = sample_tokens(gpt2_checkpoint)
    fired: list[tuple[int, ...]] = []

    def steer(value: torch.Tensor, hook: Any) -> torch.Tensor:
        fired.append(tuple(value.shape))
        return value + 0.5

    hooks = [("blocks.0.hook_resid_post", steer)]
    model = our_model(gpt2_checkpoint)
    expected = model.run_with_hooks(tokens, fwd_hooks=hooks)

    model, counting = compiled_model(gpt2_checkpoint)
    eager_after.append(model)
    fired.clear()
    actual = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert fired == [(*tokens.shape, model.cfg.d_model)]
    assert counting.calls == model.cfg.n_layers - 1  # all but the hooked layer
    diff = float((actual - expected).abs().max())
    assert diff <= COMPILED_ATOL, f"hooked compiled run differs from eager by {diff:.3g}"


def test_compiled_run_with_cache_equals_transformer_lens(
    checkpoint: Path, eager_after: list[Any]
) -> None:
    tokens = sample_tokens(checkpoint)
    last = f"blocks.{tl_model(checkpoint).cfg.n_layers - 1}."

    def names(name: str) -> bool:  # the last layer captured: the layers before it compile
        return name.startswith(last) or name.startswith("ln_final")

    ref_logits, ref_cache = tl_model(checkpoint).run_with_cache(tokens, names_filter=names)
    model, counting = compiled_model(checkpoint)
    eager_after.append(model)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    assert counting.calls == model.cfg.n_layers - 1
    assert_caches_close(
        {"logits": logits, **as_dict(cache)}, {"logits": ref_logits, **as_dict(ref_cache)}
    )
