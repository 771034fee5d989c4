"""What the server tells clients about its model: config, hook points, tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hooklab_proto import (
    DetokenizeRequest,
    DetokenizeResponse,
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
from .context import OpsContext
from .errors import RequestError
from .inputs import check_text, check_vocabulary, ids_tensor


def public_name(name: str | None) -> str | None:
    """A model name fit to show clients: a local path becomes its last component (the
    server's file layout is nobody's business)."""
    if name is None:
        return None
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


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
    shown = cfg.to_dict()
    shown["model_name"] = public_name(cfg.model_name)
    shown["tokenizer_name"] = public_name(cfg.tokenizer_name)
    return ModelInfo(
        model_name=shown["model_name"],
        cfg=shown,
        hook_points=[
            HookPointInfo(
                name=name,
                shape=list(hook_shape(name, cfg)),
                fires_by_default=fires_by_default(name, cfg),
            )
            for name in model.hook_names
        ],
        tokenizer=tokenizer_info,
        limits=Limits(**settings.limits()),  # the same field names, by design
    )


def tokenizer_files(model: HookedTransformer) -> dict[str, str]:
    """The tokenizer as the text files ``save_pretrained`` writes."""
    if model.tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        model.tokenizer.save_pretrained(folder)
        return {path.name: path.read_text() for path in Path(folder).iterdir() if path.is_file()}


def tokenize_text(ctx: OpsContext, request: TokenizeRequest) -> TokenizeResponse:
    model = ctx.model
    if not request.input:
        raise RequestError(ErrorCode.VALIDATION, "'input' must be a string or a non-empty list")
    check_text(ctx, request.input)
    prepend_bos, side = model._defaults(request.prepend_bos, request.padding_side)
    # TransformerLens's to_tokens: cut to the context (a forward refuses such input instead).
    tokens = model.to_tokens(request.input, prepend_bos, side)  # type: ignore[arg-type]
    assert model.tokenizer is not None  # check_text refuses text without one
    mask = attention_mask_for(model.tokenizer, tokens, prepend_bos, side)
    return TokenizeResponse(
        tokens=tokens.tolist(),
        attention_mask=mask.tolist(),
        str_tokens=[model.to_str_tokens(row) for row in tokens],  # type: ignore[misc]
    )


def detokenize_ids(ctx: OpsContext, request: DetokenizeRequest) -> DetokenizeResponse:
    model = ctx.model
    if model.tokenizer is None:
        raise RequestError(ErrorCode.VALIDATION, "this model has no tokenizer")
    tokens = ids_tensor(request.tokens, "tokens")
    check_vocabulary(ctx, tokens)
    text = model.to_string(tokens if isinstance(request.tokens[0], list) else tokens[0])
    return DetokenizeResponse(text=text)
