"""The forward operations behind /v1/forward, /v1/run_with_cache and /v1/run_with_hooks.

Everything a request asks for is validated here — inputs, limits, hook names, hook specs and the
size of the response — before the engine runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hooklab_proto import (
    OUTPUT_LOGITS,
    OUTPUT_LOSS,
    OUTPUT_RESIDUAL,
    ErrorCode,
    ForwardRequest,
    RunWithCacheRequest,
    TensorRef,
    TensorValue,
    WireFormatError,
    inline_tensor,
)
from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.shapes import axis_sizes, fires_by_default, hook_shape

from ..settings import Settings
from ..store import Store
from .errors import RequestError
from .specs import compile_specs, resolve_hook_names


def ids_tensor(value: list, what: str) -> torch.Tensor:
    """Nested lists of integer ids as a [batch, pos] tensor; RequestError when not rectangular
    or outside int64."""
    rows = value if value and isinstance(value[0], list) else [value]
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise RequestError(ErrorCode.BAD_SHAPE, f"{what} must be a non-empty rectangle of ids")
    try:
        return torch.tensor(rows, dtype=torch.long)
    except (ValueError, OverflowError, RuntimeError, TypeError):
        raise RequestError(
            ErrorCode.VALIDATION, f"{what} must hold integers within the int64 range"
        ) from None


@dataclass
class RunResult:
    outputs: dict[str, torch.Tensor]
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_id: str | None = None


@dataclass
class _Prepared:
    input: torch.Tensor  # token ids [batch, pos], or a residual [batch, pos, d_model]
    tokens: torch.Tensor | None
    attention_mask: torch.Tensor | None

    @property
    def batch(self) -> int:
        return self.input.shape[0]

    @property
    def pos(self) -> int:
        return self.input.shape[1]


class Runner:
    """Operations on one shared, read-only model; safe to call from several threads."""

    def __init__(self, model: HookedTransformer, store: Store, settings: Settings) -> None:
        self.model = model
        self.store = store
        self.settings = settings

    # --- tensors in requests --------------------------------------------------------------

    def tensor(self, value: TensorValue) -> torch.Tensor:
        if isinstance(value, TensorRef):
            stored = self.store.get("tensor", value.ref).value
            assert isinstance(stored, torch.Tensor)
            return stored
        try:
            return inline_tensor(value)
        except WireFormatError as exc:
            raise RequestError(ErrorCode.BAD_SHAPE, f"bad tensor: {exc}") from None

    def cached_activation(self, cache_id: str, name: str) -> torch.Tensor:
        cache = self.store.get("cache", cache_id).value
        assert isinstance(cache, dict)
        if name not in cache:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"stored cache {cache_id!r} has no activation {name!r}",
                status=404,
            )
        return cache[name]

    def ids(self, value: object, what: str) -> torch.Tensor:
        """Integer ids [batch, pos] from nested lists or a tensor value."""
        if isinstance(value, list):
            return ids_tensor(value, what)
        tensor = self.tensor(value)  # type: ignore[arg-type]
        if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.dim() not in (1, 2):
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"{what} must be integers of shape [pos] or [batch, pos], got {tensor.dtype} "
                f"{list(tensor.shape)}",
            )
        return (tensor if tensor.dim() == 2 else tensor.unsqueeze(0)).long()

    # --- inputs and limits ----------------------------------------------------------------

    def check_vocabulary(self, tokens: torch.Tensor) -> None:
        vocab = self.model.cfg.d_vocab
        outside = tokens[(tokens < 0) | (tokens >= vocab)]
        if outside.numel():
            raise RequestError(
                ErrorCode.BAD_INDEX,
                f"token id {int(outside[0])} is outside the vocabulary (0..{vocab - 1})",
            )

    def prepare(self, request: ForwardRequest) -> _Prepared:
        model, cfg = self.model, self.model.cfg
        tokens = mask = None
        if request.start_at_layer is not None:
            if request.residual is None:
                raise RequestError(ErrorCode.VALIDATION, "start_at_layer needs 'residual'")
            if request.input is not None:
                raise RequestError(
                    ErrorCode.VALIDATION,
                    "with start_at_layer send the residual in 'residual', not 'input'",
                )
            start = self.tensor(request.residual)
            if start.dim() != 3 or start.shape[-1] != cfg.d_model or not start.is_floating_point():
                raise RequestError(
                    ErrorCode.BAD_SHAPE,
                    f"residual must be floats [batch, pos, {cfg.d_model}], got {start.dtype} "
                    f"{list(start.shape)}",
                )
            start = start.to(cfg.dtype)
            if request.tokens is not None:
                tokens = self.ids(request.tokens, "tokens")
                if tokens.shape != start.shape[:2]:
                    raise RequestError(
                        ErrorCode.BAD_SHAPE,
                        f"tokens {list(tokens.shape)} must match the residual's "
                        f"[batch, pos] {list(start.shape[:2])}",
                    )
        elif request.input is None:
            raise RequestError(ErrorCode.VALIDATION, "'input' (text or token ids) is required")
        elif isinstance(request.input, str) or (
            isinstance(request.input, list) and request.input and isinstance(request.input[0], str)
        ):
            if model.tokenizer is None:
                raise RequestError(
                    ErrorCode.VALIDATION, "this model has no tokenizer; send token ids"
                )
            start, mask = model.tokens_and_mask(
                request.input, request.prepend_bos, request.padding_side
            )
            tokens = start
        else:
            start = tokens = self.ids(request.input, "input")
        if tokens is not None:
            self.check_vocabulary(tokens)
        if request.attention_mask is not None:
            mask = self.ids(request.attention_mask, "attention_mask")
            if mask.shape != start.shape[:2] or bool(((mask != 0) & (mask != 1)).any()):
                raise RequestError(
                    ErrorCode.BAD_SHAPE,
                    f"attention_mask must be 0/1 of shape {list(start.shape[:2])}",
                )
        prepared = _Prepared(start.to(model.device), tokens, mask)
        self._check_limits(prepared, request)
        return prepared

    def _check_limits(self, prepared: _Prepared, request: ForwardRequest) -> None:
        cfg, limits = self.model.cfg, self.settings
        if prepared.pos > cfg.n_ctx:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"{prepared.pos} positions exceed the model's context of {cfg.n_ctx}",
                status=413,
            )
        if prepared.batch > limits.max_batch:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"batch of {prepared.batch} exceeds the limit of {limits.max_batch}",
                status=413,
            )
        if prepared.batch * prepared.pos > limits.max_tokens:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"{prepared.batch * prepared.pos} tokens exceed the limit of {limits.max_tokens} "
                "per request",
                "split the batch into several requests",
                status=413,
            )
        for name, layer in (
            ("start_at_layer", request.start_at_layer),
            ("stop_at_layer", request.stop_at_layer),
        ):
            if layer is not None and not -cfg.n_layers <= layer <= cfg.n_layers:
                raise RequestError(
                    ErrorCode.VALIDATION,
                    f"{name}={layer} is outside -{cfg.n_layers}..{cfg.n_layers}",
                )
        if request.return_type in ("loss", "both") and prepared.tokens is None:
            raise RequestError(ErrorCode.VALIDATION, "a loss needs token ids ('input' or 'tokens')")

    def cache_names(self, names: list[str] | None) -> list[str]:
        """Validated names (exact or glob); None means every hook point that fires by default."""
        hook_names = self.model.hook_names
        firing = [name for name in hook_names if fires_by_default(name, self.model.cfg)]
        if names is None:
            return firing
        resolved = [
            match for name in names for match in resolve_hook_names(name, hook_names, firing)
        ]
        return list(dict.fromkeys(resolved))

    def _response_bytes(self, names: list[str], prepared: _Prepared) -> int:
        cfg = self.model.cfg
        sizes = axis_sizes(cfg, prepared.batch, prepared.pos)
        itemsize = cfg.dtype.itemsize
        total = prepared.batch * prepared.pos * cfg.d_vocab_out * itemsize  # logits
        for name in names:
            total += math.prod(sizes[axis] for axis in hook_shape(name, cfg)) * itemsize
        return total

    # --- running --------------------------------------------------------------------------

    def run(self, request: ForwardRequest) -> RunResult:
        prepared = self.prepare(request)
        caching = request if isinstance(request, RunWithCacheRequest) else None
        if caching is not None and caching.names == []:
            caching = None  # run_with_hooks without names: nothing to cache
        names = self.cache_names(caching.names) if caching is not None else []
        if caching is not None and caching.remove_batch_dim and prepared.batch != 1:
            raise RequestError(
                ErrorCode.VALIDATION,
                f"remove_batch_dim needs a batch of 1, got {prepared.batch}",
            )
        estimate = self._response_bytes(names, prepared)
        if estimate > self.settings.max_response_bytes:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"the response would be about {estimate} bytes, over the limit of "
                f"{self.settings.max_response_bytes}",
                "cache fewer hook points, or send a smaller batch",
                status=413,
            )
        hooks = compile_specs(
            request.hooks,
            self.model,
            prepared.batch,
            prepared.pos,
            self.tensor,
            self.cached_activation,
        )
        kwargs = dict(
            return_type=request.return_type,
            loss_per_token=request.loss_per_token,
            start_at_layer=request.start_at_layer,
            stop_at_layer=request.stop_at_layer,
            tokens=prepared.tokens,
            attention_mask=prepared.attention_mask,
            fwd_hooks=hooks,
        )
        if caching is None:
            return RunResult(_outputs(self.model.forward(prepared.input, **kwargs), request))
        out, cache = self.model.run_with_cache(prepared.input, names_filter=names, **kwargs)
        result = RunResult(_outputs(out, request))
        if caching.store:  # stored with its batch axis, so it can be a patch source
            result.cache_id = self.store.put("cache", cache).id
        if caching.return_cache:
            result.cache = (
                {name: value[0] for name, value in cache.items()}
                if caching.remove_batch_dim
                else cache
            )
        return result


def _outputs(out: object, request: ForwardRequest) -> dict[str, torch.Tensor]:
    if request.stop_at_layer is not None:
        return {OUTPUT_RESIDUAL: out}  # type: ignore[dict-item]
    if request.return_type == "logits":
        return {OUTPUT_LOGITS: out}  # type: ignore[dict-item]
    if request.return_type == "loss":
        return {OUTPUT_LOSS: out}  # type: ignore[dict-item]
    if request.return_type == "both":
        logits, loss = out  # type: ignore[misc]
        return {OUTPUT_LOGITS: logits, OUTPUT_LOSS: loss}
    return {}
