"""A model without weights: the configuration, hook points and tokenizer of a served model, for
a process that validates requests but never runs them (the API tier of a scaled-out
deployment, whose workers hold the weights).

Parameters live on the ``meta`` device (no memory); inputs and tensors built while validating
live on the CPU. Running a shell raises.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import HookedConfig
from .loading import prepare_tokenizer
from .model import HookedTransformer


class ModelShell(HookedTransformer):
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a model shell has no weights: the workers run the model")


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase | None:
    """A tokenizer from the files ``save_pretrained`` wrote (as workers publish them)."""
    if not files:
        return None
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / Path(name).name).write_text(text)
        return prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def model_shell(cfg: dict[str, Any], tokenizer_files: dict[str, str]) -> ModelShell:
    config = HookedConfig.from_dict({**cfg, "device": "cpu"})
    with torch.device("meta"):
        return ModelShell(config, tokenizer_from_files(tokenizer_files))
