"""OpenAI-compatible routes (issue 15), driven by the real ``openai`` SDK (and curl) against the
session servers in both deployments: completions and chat, streamed and not, ``n`` choices,
``stop`` strings, seeded sampling, logprobs and usage; the same tokens as /v1/generate with the
same settings and hooks; errors the SDK raises with the server's message.

References: /v1/generate on the same server (its own tests compare it with TransformerLens and
Hugging Face), the model's logits from /v1/forward for the log-probabilities, and Hugging Face's
``apply_chat_template`` for the chat prompt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from fixtures.served import ServeIn

from .e2e_servers import PROMPTS, Served
from .test_generate import metric

# A ChatML-like template in the fixture tokenizer's own special tokens; it refuses a
# conversation that opens with the assistant (as many real templates do).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversations start with a system or user message') }}{% endif %}"
    "{% for message in messages %}<|bos|>{{ message['role'] }}\n{{ message['content'] }}<|eos|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def f(x): return x + 1"},
]
GREEDY = {"temperature": 0}


def _client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _model(served: Served) -> str:
    return str(httpx.get(f"{served.url}/v1/models").json()["models"][0]["model_name"])


def _generate(served: Served, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{served.url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _texts(tokenizer: Any, generated: dict[str, Any], prompt_width: int) -> list[str]:
    """Each row's new text as /v1/generate made it: the tokens after the prompt, up to eos."""
    texts = []
    for row in generated["tokens"]:
        new = row[prompt_width:]
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(
            tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
    return texts


def _width(served: Served, prompt: str) -> int:
    return int(served.model.to_tokens(prompt).shape[1])


@pytest.fixture(scope="module")
def tokenizer(gpt2_checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(gpt2_checkpoint)


@pytest.fixture(scope="session")
def chat_checkpoint(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPT-2 checkpoint with a chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("ckpt-chat")
    for item in gpt2_checkpoint.iterdir():
        shutil.copy(item, folder / item.name)
    chat_tokenizer = AutoTokenizer.from_pretrained(gpt2_checkpoint)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_server(serve_in: ServeIn, chat_checkpoint: Path) -> Iterator[Served]:
    with serve_in(chat_checkpoint, None) as served:
        yield served


# --- completions ----------------------------------------------------------------------------


def test_the_sdk_lists_the_served_models(gpt2_server: Served) -> None:
    listed = [card.id for card in _client(gpt2_server).models.list()]
    assert listed == [_model(gpt2_server)]


def test_greedy_completion_equals_generate(gpt2_server: Served, tokenizer: Any) -> None:
    client = _client(gpt2_server)
    completion = client.completions.create(
        model=_model(gpt2_server), prompt=PROMPTS[0], max_tokens=10, **GREEDY
    )
    generated = _generate(gpt2_server, input=PROMPTS[0], max_new_tokens=10, do_sample=False)
    [choice] = completion.choices
    assert choice.text == _texts(tokenizer, generated, _width(gpt2_server, PROMPTS[0]))[0]
    assert completion.object == "text_completion" and completion.model == _model(gpt2_server)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == _width(gpt2_server, PROMPTS[0])  # BOS included
    # one row: its steps, an eos included
    assert completion.usage.completion_tokens == generated["stats"]["new_tokens"]


def test_seeded_choices_equal_generate_and_repeat(gpt2_server: Served, tokenizer: Any) -> None:
    client, model = _client(gpt2_server), _model(gpt2_server)
    options: dict[str, Any] = dict(max_tokens=12, temperature=0.8, top_p=0.9, n=3, seed=5)
    first = client.completions.create(model=model, prompt=PROMPTS[1], **options)
    again = client.completions.create(model=model, prompt=PROMPTS[1], **options)
    other = client.completions.create(model=model, prompt=PROMPTS[1], **{**options, "seed": 6})
    generated = _generate(
        gpt2_server, input=[PROMPTS[1]] * 3, max_new_tokens=12, temperature=0.8, top_p=0.9,
        seed=5,
    )  # fmt: skip
    texts = [choice.text for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.text for choice in again.choices]
    assert texts == _texts(tokenizer, generated, _width(gpt2_server, PROMPTS[1]))
    assert len(set(texts)) > 1  # the choices are samples, not copies
    assert texts != [choice.text for choice in other.choices]


def test_stream_equals_the_plain_call(gpt2_server: Served) -> None:
    client, model = _client(gpt2_server), _model(gpt2_server)
    options: dict[str, Any] = dict(max_tokens=10, temperature=1.2, n=2, seed=3)
    plain = client.completions.create(model=model, prompt=PROMPTS[0], **options)
    texts, finished, usage = ["", ""], [None, None], None
    chunks = client.completions.create(
        model=model, prompt=PROMPTS[0], stream=True, stream_options={"include_usage": True},
        **options,
    )  # fmt: skip
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts == [choice.text for choice in plain.choices]
    assert finished == [choice.finish_reason for choice in plain.choices]
    assert usage == plain.usage


def test_stop_strings_end_choices_before_them(gpt2_server: Served) -> None:
    client, model = _client(gpt2_server), _model(gpt2_server)
    options: dict[str, Any] = dict(max_tokens=16, temperature=1.0, seed=11)
    free = client.completions.create(model=model, prompt=PROMPTS[0], **options).choices[0]
    stop = free.text[len(free.text) // 2 :][:3]
    expected = free.text[: free.text.index(stop)]
    stopped = client.completions.create(model=model, prompt=PROMPTS[0], stop=[stop], **options)
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens < 16
    streamed = client.completions.create(
        model=model, prompt=PROMPTS[0], stop=stop, stream=True, **options
    )
    assert "".join(choice.text for chunk in streamed for choice in chunk.choices) == expected
    # /v1/generate stops the row there too: its text keeps the stop string, nothing after
    generated = _generate(
        gpt2_server, input=PROMPTS[0], max_new_tokens=16, seed=11, stop=[stop], stop_at_eos=False
    )
    assert generated["stats"]["new_tokens"] == stopped.usage.completion_tokens


def test_logprobs_are_the_model_log_softmax(gpt2_server: Served) -> None:
    client, model = _client(gpt2_server), _model(gpt2_server)
    completion = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=4, logprobs=3, **GREEDY
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value)  # greedy: the best
        assert top.get(token, value) == pytest.approx(value)
    assert logprobs.text_offset[0] == 0
    # The first new token's log-probability under the model's logits for the prompt
    tokens = gpt2_server.model.to_tokens(PROMPTS[1])
    expected = gpt2_server.model(tokens)[0, -1].log_softmax(-1).max().item()
    assert logprobs.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    # /v1/generate answers the same values
    generated = _generate(
        gpt2_server, input=PROMPTS[1], max_new_tokens=4, do_sample=False, logprobs=3
    )
    values = [step["logprob"] for step in generated["logprobs"][0]]
    assert values == pytest.approx(logprobs.token_logprobs)


def test_hooks_extension_steers_like_generate(gpt2_server: Served, tokenizer: Any) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    hooks = [
        {
            "hook": "blocks.0.hook_resid_post",
            "op": "steer",
            "vector": {"dtype": "F32", "shape": [64], "data": vector.tolist()},
            "coeff": 4.0,
        }
    ]
    client, model = _client(gpt2_server), _model(gpt2_server)
    steered = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=12, extra_body={"hooks": hooks}, **GREEDY
    )
    plain = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, **GREEDY)
    generated = _generate(
        gpt2_server, input=PROMPTS[1], max_new_tokens=12, do_sample=False, hooks=hooks
    )
    expected = _texts(tokenizer, generated, _width(gpt2_server, PROMPTS[1]))[0]
    assert steered.choices[0].text == expected
    assert steered.choices[0].text != plain.choices[0].text


def test_closing_a_stream_stops_the_generation(gpt2_server: Served) -> None:
    url = gpt2_server.url
    cancelled = metric(url, "generations_cancelled")
    chunks = _client(gpt2_server).completions.create(
        model=_model(gpt2_server), prompt=[5, 6, 7], max_tokens=120, stream=True, **GREEDY
    )
    next(iter(chunks))
    chunks.close()
    deadline = time.monotonic() + 10
    while metric(url, "generations_cancelled") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "generations_cancelled") == cancelled + 1


def test_curl_streams_server_sent_events(gpt2_server: Served) -> None:
    body = {"model": _model(gpt2_server), "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    result = subprocess.run(
        ["curl", "-sN", f"{gpt2_server.url}/v1/completions", "-H",
         "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    events = [line for line in result.stdout.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events), result.stdout
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# --- chat -----------------------------------------------------------------------------------


def test_chat_follows_the_template_and_equals_generate(
    chat_server: Served, chat_checkpoint: Path
) -> None:
    chat_tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    text = chat_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = chat_tokenizer.encode(text, add_special_tokens=False)
    client, model = _client(chat_server), _model(chat_server)
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=2, **GREEDY
    )
    generated = _generate(chat_server, input=[ids], max_new_tokens=10, do_sample=False)
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == _texts(chat_tokenizer, generated, len(ids))[0]
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    streamed = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_with_hooks_and_choices(chat_server: Served) -> None:
    client, model = _client(chat_server), _model(chat_server)
    hooks = [{"hook": "blocks.1.hook_mlp_out", "op": "ablate"}]
    ablated = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=8, n=2, seed=4,
        extra_body={"hooks": hooks},
    )  # fmt: skip
    again = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=8, n=2, seed=4,
        extra_body={"hooks": hooks},
    )  # fmt: skip
    plain = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=8, n=2, seed=4
    )
    contents = [choice.message.content for choice in ablated.choices]
    assert contents == [choice.message.content for choice in again.choices]
    assert contents != [choice.message.content for choice in plain.choices]
    assert ablated.usage is not None and ablated.usage.completion_tokens <= 16


def test_chat_template_refusal_is_a_clear_error(chat_server: Served) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="start with a system or user"):
        _client(chat_server).chat.completions.create(
            model=_model(chat_server), messages=[{"role": "assistant", "content": "hi"}]
        )


# --- errors ---------------------------------------------------------------------------------


def test_chat_without_a_template_names_the_fix(gpt2_server: Served) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="no chat template") as raised:
        _client(gpt2_server).chat.completions.create(
            model=_model(gpt2_server), messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "validation_error"
    assert "chat_template" in raised.value.body["hint"]  # type: ignore[index]


@pytest.mark.parametrize(
    "body,status,code,words",
    [
        ({"prompt": "x", "max_tokens": "10"}, 422, "validation_error", "max_tokens"),
        ({"prompt": "x", "best_of": 2}, 422, "validation_error", "best_of"),
        ({"prompt": "x", "n": 100}, 413, "too_large", "max_batch"),
        ({"prompt": "x", "max_tokens": 1000}, 413, "too_large", "context"),
        ({"prompt": "x", "frequency_penalty": 0.5}, 422, "validation_error", "penalties"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 422, "validation_error",
         "stream"),
        ({"prompt": "x", "hooks": [{"hook": "blocks.9.hook_resid_post", "op": "ablate"}]},
         422, "unknown_hook", "blocks.9"),
        ({"prompt": [[1, 2], [3]]}, 422, "bad_shape", "lengths"),
    ],
    ids=["field-type", "unknown-field", "n-too-large", "past-context", "penalty",
         "stream-options", "unknown-hook", "ragged-ids"],
)  # fmt: skip
def test_bad_requests_are_clear_errors(
    gpt2_server: Served, body: dict[str, Any], status: int, code: str, words: str
) -> None:
    body = {"model": _model(gpt2_server), **body}
    with pytest.raises(openai.APIStatusError) as raised:
        _client(gpt2_server).completions.create(**_sdk_arguments(body))
    assert raised.value.status_code == status
    assert raised.value.code == code
    assert words in raised.value.message


def test_an_unknown_model_is_named(gpt2_server: Served, deployment: str) -> None:
    """Embedded: 404 (it serves one model for life); scaled out: 503 (its workers may come)."""
    with pytest.raises(openai.APIStatusError, match="'nope'") as raised:
        _client(gpt2_server).completions.create(model="nope", prompt="x")
    assert raised.value.status_code == (404 if deployment == "embedded" else 503)


def _sdk_arguments(body: dict[str, Any]) -> dict[str, Any]:
    """The SDK's own arguments, the rest as extra_body (sent as given, bad types included)."""
    known = {"model", "prompt", "n", "max_tokens", "frequency_penalty", "stream_options"}
    extra = {key: value for key, value in body.items() if key not in known}
    arguments = {key: value for key, value in body.items() if key in known}
    return {**arguments, "extra_body": extra} if extra else arguments


def test_openapi_describes_the_routes_with_typed_schemas(gpt2_server: Served) -> None:
    spec = httpx.get(f"{gpt2_server.url}/openapi.json").json()
    for path, request, response, chunk in (
        ("/v1/completions", "CompletionRequest", "Completion", "Completion"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
    ):
        post = spec["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        content = post["responses"]["200"]["content"]
        assert body.endswith(f"/{request}")
        assert content["application/json"]["schema"]["$ref"].endswith(f"/{response}")
        assert content["text/event-stream"]["schema"]["$ref"].endswith(f"/{chunk}")
        assert {request, response, chunk} <= set(spec["components"]["schemas"])
    hooks = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["hooks"]
    assert hooks["items"]["discriminator"]["propertyName"] == "op"  # the same hook specs


def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(gpt2_server: Served) -> None:
    """A steer that overflows the residual leaves no distribution to sample from: the stream has
    started (200), so the error arrives as a data event in hooklab's envelope."""
    overflow = {
        "hook": "blocks.0.hook_resid_post",
        "op": "steer",
        "vector": {"dtype": "F32", "shape": [64], "data": [1e30] * 64},
        "coeff": 1e30,
    }
    chunks = _client(gpt2_server).completions.create(
        model=_model(gpt2_server), prompt=PROMPTS[0], max_tokens=4, stream=True,
        extra_body={"hooks": [overflow]},
    )  # fmt: skip
    with pytest.raises(openai.APIError, match="cannot sample") as raised:
        list(chunks)
    assert raised.value.code == "validation_error"
