"""The forward operations behind /v1/forward, /v1/run_with_cache and /v1/run_with_hooks.

``validate_forward`` checks everything a request asks for — inputs, limits, hook names, hook
specs, the size of the response — and returns a :class:`ForwardWork` with its cost; only then
does ``run_forward`` touch the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from hooklab_proto import (
    OUTPUT_LOGITS,
    OUTPUT_LOSS,
    OUTPUT_OBJECTIVE,
    OUTPUT_RESIDUAL,
    OUTPUT_VALUE,
    ErrorCode,
    ForwardRequest,
    RunWithCacheRequest,
    RunWithHooksRequest,
    StoredCacheFields,
    for_the_wire,
)
from hooklab_server.engine import HookedTransformer, Output
from hooklab_server.engine.shapes import fires_by_default

from ..auth import Account
from .cancel import CancelToken
from .context import OpsContext
from .cost import (
    Cost,
    activation_elements,
    backward_bytes,
    check_response,
    response_size,
    with_slack,
    working_bytes,
)
from .errors import RequestError
from .gradients import Backward, backward_hooks, forward_backward, validate_backward
from .graphs import CompiledGraph, compile_graph
from .inputs import attention_mask, check_size, check_vocabulary, ids, token_batch
from .objects import cache_entries
from .sparse import TopKForm, validate_top_k
from .specs import HookFn, compile_specs, resolve_hook_names

if TYPE_CHECKING:
    from .capture_stream import CaptureStream


@dataclass
class TensorsResult:
    """Named tensors for the response, and the begin frame's fields."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, object] = field(default_factory=dict)


@dataclass
class ForwardWork:
    """A validated forward: everything resolved, nothing run yet."""

    op: str  # forward | run_with_cache | run_with_hooks
    input: torch.Tensor  # token ids [batch, pos], or a residual [batch, pos, d_model]
    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    hooks: list[tuple[str, HookFn]]
    names: list[str]  # activations to capture (none: a plain forward)
    request: ForwardRequest
    cost: Cost
    caller: Account  # owns the cache, when one is stored
    wants_json: bool  # the response's form (its size limits differ)
    logits_graph: CompiledGraph | None = None  # returned instead of the logits when given
    backward: Backward | None = None  # a backward pass after the forward (gradients)
    stream: CaptureStream | None = None  # where captures go while it runs (set by the executor)
    # The model as this request sees it (its uploaded SAEs attached); None: the served one.
    model: HookedTransformer | None = None
    top_k: TopKForm | None = None  # captures sent as their top k (sparse_top_k)

    @property
    def caching(self) -> RunWithCacheRequest | None:
        return (
            self.request if self.names and isinstance(self.request, RunWithCacheRequest) else None
        )


def op_name(request: ForwardRequest) -> str:
    if isinstance(request, RunWithHooksRequest):
        return "run_with_hooks"
    if isinstance(request, RunWithCacheRequest):
        return "run_with_cache"
    return "forward"


def cache_names(ctx: OpsContext, names: list[str] | None) -> list[str]:
    """Validated names (exact or glob), de-duplicated in firing order; None means every hook
    point that fires by default."""
    model = ctx.model
    firing = [name for name in model.hook_names if fires_by_default(name, model.cfg)]
    if names is None:
        return firing
    resolved = [
        match for name in names for match in resolve_hook_names(name, model.hook_names, firing)
    ]
    return list(dict.fromkeys(resolved))


def _residual_input(
    ctx: OpsContext, request: ForwardRequest
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg = ctx.model.cfg
    if request.residual is None:
        raise RequestError(ErrorCode.VALIDATION, "start_at_layer needs 'residual'")
    if request.input is not None:
        raise RequestError(
            ErrorCode.VALIDATION, "with start_at_layer send the residual in 'residual', not 'input'"
        )
    start = ctx.finite_tensor(request.residual, "residual")
    if start.dim() != 3 or start.shape[-1] != cfg.d_model or not start.is_floating_point():
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"residual must be floats [batch, pos, {cfg.d_model}], got "
            f"{str(start.dtype).removeprefix('torch.')} {list(start.shape)}",
        )
    tokens = None
    if request.tokens is not None:
        tokens = ids(ctx, request.tokens, "tokens")
        if tokens.shape != start.shape[:2]:
            raise RequestError(
                ErrorCode.BAD_SHAPE,
                f"tokens {list(tokens.shape)} must match the residual's [batch, pos] "
                f"{list(start.shape[:2])}",
            )
        check_vocabulary(ctx, tokens)
        tokens = tokens.to(ctx.model.device)
    check_size(ctx, int(start.shape[0]), int(start.shape[1]))
    return start.to(ctx.model.device, cfg.dtype), tokens


def validate_forward(ctx: OpsContext, request: ForwardRequest, wants_json: bool) -> ForwardWork:
    model, cfg = ctx.model, ctx.model.cfg
    mask = None
    if request.start_at_layer is not None:
        start, tokens = _residual_input(ctx, request)
    elif request.input is None:
        raise RequestError(ErrorCode.VALIDATION, "'input' (text or token ids) is required")
    else:
        batch = token_batch(ctx, request.input, "input", request.prepend_bos, request.padding_side)
        start, tokens, mask = batch.tokens, batch.tokens, batch.mask
    size, length = int(start.shape[0]), int(start.shape[1])
    if request.attention_mask is not None:
        mask = attention_mask(ctx, request.attention_mask, size, length)
    for name, layer in (
        ("start_at_layer", request.start_at_layer),
        ("stop_at_layer", request.stop_at_layer),
    ):
        if layer is not None and not -cfg.n_layers <= layer <= cfg.n_layers:
            raise RequestError(
                ErrorCode.VALIDATION, f"{name}={layer} is outside -{cfg.n_layers}..{cfg.n_layers}"
            )
    if request.return_type in ("loss", "both") and tokens is None:
        raise RequestError(ErrorCode.VALIDATION, "a loss needs token ids ('input' or 'tokens')")

    names: list[str] = []
    if isinstance(request, RunWithCacheRequest) and request.names != []:
        names = cache_names(ctx, request.names)
        if request.remove_batch_dim and size != 1:
            raise RequestError(
                ErrorCode.VALIDATION, f"remove_batch_dim needs a batch of 1, got {size}"
            )
    top_k = None
    if isinstance(request, RunWithCacheRequest):
        top_k = validate_top_k(ctx, request, names, size, length)
    hooks = compile_specs(ctx, request.hooks, size, length)
    logits_graph = _logits_graph(ctx, request, size, length)
    backward = validate_backward(ctx, request, tokens, size, length)
    grads = backward is not None and backward.incl_bwd

    # Cost: captures and logits are held until sent; the working set of one block on top (a
    # backward pass: every layer's saved activations and their gradients instead).
    captured = activation_elements(model, names, size, length) * (2 if grads else 1)
    returned = captured
    lazy = isinstance(request, RunWithCacheRequest) and request.lazy
    if isinstance(request, RunWithCacheRequest) and (lazy or not request.return_cache):
        returned = 0
    elif top_k is not None:
        returned -= top_k.saved_elements
    if lazy:
        pass  # the logits or residual stay with the stored activations
    elif request.stop_at_layer is not None:
        returned += size * length * cfg.d_model
    elif logits_graph is not None and logits_graph.output_elements is not None:
        returned += logits_graph.output_elements  # the graph's result instead of the logits
    elif request.return_type in ("logits", "both"):
        returned += size * length * cfg.d_vocab_out
    itemsize = cfg.dtype.itemsize if request.wire_dtype is None else 2
    sent, building = response_size(returned, itemsize, wants_json)
    check_response(sent, wants_json, ctx.settings)
    working = working_bytes(model, size, length)
    behind = 0 if backward is None else backward_bytes(model, size, length)
    peak = captured * cfg.dtype.itemsize + building + max(working, behind)
    cost = Cost(size * length, 1, with_slack(peak), sent, with_slack(behind))
    return ForwardWork(
        op_name(request), start, tokens, mask, hooks, names, request, cost, ctx.caller, wants_json,
        logits_graph, backward, top_k=top_k,
    )  # fmt: skip


def _logits_graph(
    ctx: OpsContext, request: ForwardRequest, size: int, length: int
) -> CompiledGraph | None:
    if request.logits_graph is None:
        return None
    if request.return_type != "logits" or request.stop_at_layer is not None:
        raise RequestError(
            ErrorCode.VALIDATION,
            "logits_graph applies to the logits: return_type 'logits', no stop_at_layer",
        )
    cfg = ctx.model.cfg
    shape = (size, length, cfg.d_vocab_out)
    graph, _ = compile_graph(ctx, request.logits_graph, "logits_graph", shape, cfg.dtype, True)
    return graph


def run_forward(ctx: OpsContext, work: ForwardWork, token: CancelToken) -> TensorsResult:
    request, model = work.request, ctx.model

    def between_layers() -> None:
        token.check()
        ctx.metrics.add("work_units", op=work.op)
        if work.stream is not None:  # the blocks before this one are done with their captures
            work.stream.send_new(run.cache)

    # run_with_cache is forward with captures: the same engine call, asked for its activations.
    plan = work.backward
    run = model.hook_run(
        work.hooks, work.names, capture=work.caching is not None, interrupt=between_layers,
        bwd_hooks=backward_hooks(plan) if plan else (), incl_bwd=plan is not None and plan.incl_bwd,
    )  # fmt: skip

    def forward(return_type: str | None) -> object:
        return model.forward(
            work.input,
            return_type=return_type,  # type: ignore[arg-type]
            loss_per_token=request.loss_per_token,
            start_at_layer=request.start_at_layer,
            stop_at_layer=request.stop_at_layer,
            tokens=work.tokens,
            attention_mask=work.mask,
            hooks=run,
        )

    objective = None
    if plan is None:
        out = forward(request.return_type)
    else:
        out, objective = forward_backward(request, plan, run, forward)
    if work.stream is not None:
        work.stream.forward_ended()
    if work.caching is not None:
        token.check()
    result = finish_forward(ctx, work, out, run.cache)
    if objective is not None:
        result.tensors[OUTPUT_OBJECTIVE] = objective
    return result


def finish_forward(
    ctx: OpsContext, work: ForwardWork, out: object, cache: dict[str, torch.Tensor]
) -> TensorsResult:
    """The response of a forward from what the engine returned and what was captured."""
    outputs = _outputs(out, work.request)
    if work.logits_graph is not None:
        logits = outputs.pop(OUTPUT_LOGITS)
        value = work.logits_graph.run(logits)
        outputs[OUTPUT_VALUE] = logits if value is None else value
    result = TensorsResult(outputs)
    caching = work.caching
    if caching is None:
        return _on_the_wire(result, work.request.wire_dtype)
    if caching.lazy:  # the activations and the large outputs stay; their index travels
        kept = {name: result.tensors.pop(name) for name in _LARGE_OUTPUTS if name in result.tensors}
        cache = {**cache, **kept}
    if caching.store or caching.lazy:  # stored with its batch axis: a patch source too
        info = ctx.store.put("cache", cache, work.caller)
        index = cache_entries(cache) if caching.lazy or not caching.return_cache else None
        stored = StoredCacheFields(cache_id=info.id, expires_at=info.expires_at, entries=index)
        result.meta.update(stored.model_dump(exclude_none=True))
    if caching.return_cache and not caching.lazy:
        stream = work.stream
        result.tensors.update(
            piece
            for name, value in cache.items()
            if stream is None or not stream.was_sent(name)
            for piece in _sent_as(work.top_k, name, _batch_axis(caching, value))
        )
    return _on_the_wire(result, work.request.wire_dtype)


def _batch_axis(caching: RunWithCacheRequest, value: torch.Tensor) -> torch.Tensor:
    return value[0] if caching.remove_batch_dim else value


def _sent_as(
    top_k: TopKForm | None, name: str, value: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    return [(name, value)] if top_k is None else top_k.pieces(name, value)


def capture_on_the_wire(
    work: ForwardWork,
) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """What a capture of ``work`` becomes on the wire (sent while the work runs): named
    tensors, two for a name sent in the sparse top-k form (taken before any wire rounding)."""
    caching, wire_dtype, top_k = work.caching, work.request.wire_dtype, work.top_k
    assert caching is not None
    return lambda name, value: [
        (piece, for_the_wire(tensor, wire_dtype))
        for piece, tensor in _sent_as(top_k, name, _batch_axis(caching, value))
    ]


def _on_the_wire(result: TensorsResult, wire_dtype: str | None) -> TensorsResult:
    result.tensors = {
        name: for_the_wire(value, wire_dtype) for name, value in result.tensors.items()
    }
    return result


# Outputs a lazy run_with_cache keeps with the activations (the loss and objective travel).
_LARGE_OUTPUTS = (OUTPUT_LOGITS, OUTPUT_VALUE, OUTPUT_RESIDUAL)


def _outputs(out: object, request: ForwardRequest) -> dict[str, torch.Tensor]:
    """The engine's return value by name: a residual, logits, a loss, both, or nothing."""
    if request.return_type == "both" and request.stop_at_layer is None:
        both = cast(Output, out)
        return {OUTPUT_LOGITS: both.logits, OUTPUT_LOSS: both.loss}
    if out is None:
        return {}
    name = OUTPUT_RESIDUAL if request.stop_at_layer is not None else None
    name = name or {"logits": OUTPUT_LOGITS, "loss": OUTPUT_LOSS}[str(request.return_type)]
    return {name: cast(torch.Tensor, out)}
