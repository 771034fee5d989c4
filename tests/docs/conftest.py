"""The server the documentation's recipes run against: the GPT-2 fixture checkpoint with a chat
template in its tokenizer (so the OpenAI chat recipe works too), served in each deployment —
embedded, and scaled out over Redis (``deployment``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.e2e_servers import Served
from transformers import AutoTokenizer

from fixtures.served import ServeIn

# ChatML-like, in the fixture tokenizer's own special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|bos|>{{ message['role'] }}\n{{ message['content'] }}<|eos|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def docs_checkpoint(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPT-2 fixture checkpoint (2 layers, d_model 64) with a chat template."""
    folder = tmp_path_factory.mktemp("ckpt-docs")
    for item in gpt2_checkpoint.iterdir():
        shutil.copy(item, folder / item.name)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_checkpoint)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def docs_server(serve_in: ServeIn, docs_checkpoint: Path) -> Iterator[Served]:
    with serve_in(docs_checkpoint, None) as served:
        yield served
