"""What the server tells clients about its model: config, hook points, tokenizer."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from hooklab_proto import (
    ErrorCode,
    HookPointInfo,
    Limits,
    ModelInfo,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.shapes import fires_by_default, hook_shape
from hooklab_server.engine.tokenization import attention_mask_for

from ..settings import Settings
from .errors import RequestError


def describe_model(
    model: HookedTransformer, settings: Settings, tokenizer_file_names: list[str]
) -> ModelInfo:
    cfg = model.cfg
    tokenizer = model.tokenizer
    tokenizer_info = None
    if tokenizer is not None:
        tokenizer_info = TokenizerInfo(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            padding_side=tokenizer.padding_side,
            prepends_bos=bool(cfg.tokenizer_prepends_bos),
            files=sorted(tokenizer_file_names),
        )
    return ModelInfo(
        model_name=cfg.model_name,
        cfg=cfg.to_dict(),
        hook_points=[
            HookPointInfo(
                name=name,
                shape=list(hook_shape(name, cfg)),
                fires_by_default=fires_by_default(name, cfg),
            )
            for name in model.hook_names
        ],
        tokenizer=tokenizer_info,
        limits=Limits(**asdict(settings)),  # the same field names, by design
    )


def tokenizer_files(model: HookedTransformer) -> dict[str, str]:
    """The tokenizer as the text files ``save_pretrained`` writes."""
    if model.tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        model.tokenizer.save_pretrained(folder)
        return {path.name: path.read_text() for path in Path(folder).iterdir() if path.is_file()}


def tokenize_text(model: HookedTransformer, request: TokenizeRequest) -> TokenizeResponse:
    if not request.input:
        raise RequestError(ErrorCode.VALIDATION, "'input' must be a string or a non-empty list")
    prepend_bos, side = model._defaults(request.prepend_bos, request.padding_side)
    tokens = model.to_tokens(request.input, prepend_bos, side)  # type: ignore[arg-type]
    mask = attention_mask_for(model.tokenizer, tokens, prepend_bos, side)
    return TokenizeResponse(
        tokens=tokens.tolist(),
        attention_mask=mask.tolist(),
        str_tokens=[model.to_str_tokens(row) for row in tokens],  # type: ignore[misc]
    )
