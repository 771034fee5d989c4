"""Beyond TransformerLens's generate: stop strings end each row where its new text first holds
one (found on a window of the last tokens; checked here against the whole text), and each
step's log-probabilities are the log-softmax of the model's own logits for that sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import our_model

from hooklab_server.engine.completion_text import (
    completion_text,
    settled_length,
    stop_position,
)
from hooklab_server.engine.generation import (
    GenerationState,
    SamplingParams,
    StoppingParams,
    generate_tokens,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLED = SamplingParams(temperature=1.0, seed=3)


def _run(
    model: Any, tokens: torch.Tensor, stopping: StoppingParams
) -> tuple[GenerationState, list[torch.Tensor]]:
    state = GenerationState(model, tokens, SAMPLED, stopping)
    return state, list(generate_tokens(model, tokens, None, SAMPLED, stopping, state=state))


@pytest.mark.parametrize("where", ["middle", "start"])
def test_each_row_stops_where_its_text_first_holds_a_stop_string(
    gpt2_checkpoint: Path, where: str
) -> None:
    model = our_model(gpt2_checkpoint)
    tokens = model.to_tokens(["def f(x): return x + 1"] * 3)
    free, _ = _run(model, tokens, StoppingParams(24, stop_at_eos=False))
    width, tokenizer = tokens.shape[1], model.tokenizer
    texts = [completion_text(tokenizer, row[width - 4 : width], row[width:]) for row in
             free.tokens.tolist()]  # fmt: skip
    stop = texts[0][len(texts[0]) // 2 if where == "middle" else 0 :][:2]
    stopped, steps = _run(model, tokens, StoppingParams(24, False, None, (stop,)))
    assert stop in texts[0]
    for row, text in enumerate(texts):
        new = stopped.tokens[row, width:].tolist()
        if stop not in text:
            assert not bool(stopped.finished[row])
            continue
        # the first step whose text holds the stop string, and the row is padding after it
        ends = next(
            step for step in range(1, len(new) + 1)
            if stop in completion_text(tokenizer, tokens[row, -4:].tolist(), new[:step])
        )  # fmt: skip
        assert bool(stopped.finished[row])
        assert new[:ends] == free.tokens[row, width : width + ends].tolist()
        assert set(new[ends:]) <= {tokenizer.eos_token_id}
    if all(stop in text for text in texts):
        assert len(steps) < 24  # everyone stopped: the generation ended early


def test_step_logprobs_are_the_log_softmax_of_the_logits(gpt2_checkpoint: Path) -> None:
    model = our_model(gpt2_checkpoint)
    tokens = model.to_tokens(["The license of this file is", "def f(x): return x + 1"])
    seen = []
    state = GenerationState(model, tokens, SAMPLED, StoppingParams(5, False), logprobs=4)
    for _ in generate_tokens(model, tokens, None, SAMPLED, StoppingParams(5, False), state=state):
        assert state.last_logprobs is not None
        seen.append(state.last_logprobs)
    with torch.inference_mode():
        logprobs = model(state.tokens).log_softmax(-1)  # the whole sequence at once
    for step, recorded in enumerate(seen):
        expected = logprobs[:, tokens.shape[1] - 1 + step]
        chosen = state.tokens[:, tokens.shape[1] + step]
        picked = expected.gather(-1, chosen[:, None])[:, 0]
        assert torch.allclose(recorded.chosen, picked, atol=1e-4)
        assert torch.allclose(recorded.top_values, expected.topk(4).values, atol=1e-4)


def test_stop_positions_and_what_a_stream_may_send() -> None:
    assert stop_position("abc\n\nd", ["\n\n", "c"]) == 2
    assert stop_position("abc", ["x"]) is None
    assert settled_length("hello wor", ["world"]) == len("hello ")  # may become the stop
    assert settled_length("hello\ufffd", []) == len("hello")  # an unfinished character
    assert settled_length("hello", ["lo!", "xyz"]) == len("hel")  # "lo" may grow into "lo!"
