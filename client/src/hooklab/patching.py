"""TransformerLens's ``patching`` module against a hooklab server.

Same functions, positional arguments ``(model, corrupted_tokens, clean_cache, patching_metric)``
and return shapes as ``transformer_lens.patching``; the server runs the patched forwards batched.

* ``patching_metric``: a ``hooklab.metrics`` metric runs on the server and only the results come
  back; any other callable gets, per patch, logits ``[batch, pos, d_vocab]`` and runs here. The
  server then sends only the positions the callable reads (found by differentiating it once on
  the corrupted logits); the other positions hold the corrupted run's logits.
* ``clean_cache``: a stored cache id (``cache.cache_id`` after ``run_with_cache(..., store=True)``,
  the cheap path), or an ``ActivationCache`` / dict whose needed activations are uploaded once
  per call.

Attribution patching (``get_attr_patch_*``, one per ``get_act_patch_*``, same arguments and
shapes; or ``method="attribution"``) is the linear approximation of the same sweep: the server
runs one forward and backward of the corrupted run (and the clean run, unless its activations
are stored) and returns, per index row, the corrupted metric plus ``sum(grad * (clean -
corrupted))`` over the slice that row would patch — the estimate of what activation patching
returns there (the change alone is that minus the corrupted metric, which is 0 for a normalized
metric). The metric must run on the server: a ``hooklab.metrics`` metric or a traceable Python
function of the logits.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from hooklab_proto import PATCH_ACTIVATIONS

from .metrics import Metric, objective_wire
from .tracing import Untraceable, trace

Metricish = Callable[[torch.Tensor], torch.Tensor] | Metric
Method = Literal["activation", "attribution"]
AXES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")
# A sweep of declarative metrics is split into requests of at least this many rows (a progress
# bar for long sweeps); callable metrics are split by the size of the logits they bring back.
MIN_ROWS_PER_REQUEST = 512
MAX_LOGITS_BYTES = 256 * 2**20


# --- patch setters: TransformerLens's, usable locally; the server applies the same slices ------


def layer_pos_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, pos]: patch ``[:, pos, ...]``."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, pos, head_index]: patch ``[:, pos, head]``."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head_index]: patch ``[:, :, head]``."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head_index]: patch ``[:, head, :, :]`` of a pattern."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head_index, dest_pos]: patch ``[:, head, dest, :]`` of a pattern."""
    _, head, dest = index
    corrupted_activation[:, head, dest] = clean_activation[:, head, dest]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head_index, dest_pos, src_pos]: patch ``[:, head, dest, src]``."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


# The server applies a setter's slice by axis name; these are the setters it knows (by name,
# so TransformerLens's own setter functions work too).
_SETTERS = {
    fn.__name__
    for fn in (
        layer_pos_patch_setter,
        layer_pos_head_vector_patch_setter,
        layer_head_vector_patch_setter,
        layer_head_pattern_patch_setter,
        layer_head_pos_pattern_patch_setter,
        layer_head_dest_src_pos_pattern_patch_setter,
    )
}


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]) -> Any:
    """TransformerLens's helper: a pandas DataFrame of every index combination (needs pandas)."""
    import pandas as pd

    rows = list(itertools.product(*(range(size) for size in column_max_ranges)))
    return pd.DataFrame(rows, columns=list(column_names))


# --- the generic sweep ------------------------------------------------------------------------


def generic_activation_patch(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    patching_metric: Metricish,
    patch_setter: Callable[..., Any],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
    *,
    progress: bool = True,
    patches_per_forward: int | None = None,
    method: Method = "activation",
) -> Any:
    """TransformerLens's ``generic_activation_patch``: the metric of the corrupted run with one
    slice of the clean activation patched in, per index row. Shaped by the index axes, or flat
    (one value per ``index_df`` row) when ``index_df`` is given. ``method="attribution"``: the
    linear estimate of the same values from one forward and backward (module docstring)."""
    if getattr(patch_setter, "__name__", None) not in _SETTERS:
        raise TypeError(
            f"patch_setter {patch_setter!r} cannot run on the server; use one of "
            f"{', '.join(sorted(_SETTERS))} (hooklab.patching or transformer_lens.patching)"
        )
    if activation_name not in PATCH_ACTIVATIONS:
        raise ValueError(f"cannot patch {activation_name!r}; one of {', '.join(PATCH_ACTIVATIONS)}")
    tokens = corrupted_tokens if corrupted_tokens.dim() == 2 else corrupted_tokens[None]
    tokens = tokens.long().cpu()
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names or index_df")
        axes = list(index_axis_names)
        ranges = _ranges(model, activation_name, axes, tokens.shape[-1])
        rows = list(itertools.product(*(range(size) for size in ranges)))
        shape = ranges
    else:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        axes = [str(column) for column in index_df.columns]
        rows = [tuple(int(v) for v in row) for row in index_df.itertuples(index=False)]
        shape = [len(rows)]
    bad = [axis for axis in axes if axis not in AXES]
    if bad:
        raise ValueError(f"unknown index axis {bad[0]!r}; axes are {', '.join(AXES)}")

    with _CleanSource(model, clean_cache, activation_name, {row[0] for row in rows}) as clean:
        body = {"corrupted": tokens, **clean.body, "activation": activation_name, "axes": axes}
        if patches_per_forward is not None:
            body["patches_per_forward"] = patches_per_forward
        if method == "attribution":
            values = _attribution(model, body, rows, index_df is not None, tokens, patching_metric)
        elif isinstance(patching_metric, Metric):
            values = _declarative(model, body, rows, patching_metric, progress)
        else:
            values = _callable(model, body, rows, tokens, patching_metric, progress)
    result = values.reshape(shape)
    if return_index_df:
        index = index_df if index_df is not None else make_df_from_ranges(shape, axes)
        return result, index
    return result


def _ranges(model: Any, activation_name: str, axes: list[str], pos: int) -> list[int]:
    """Per-axis sizes as TransformerLens computes them (k/v count key-value heads)."""
    cfg = model.cfg
    heads = cfg.n_heads
    if activation_name in ("k", "v") and getattr(cfg, "n_key_value_heads", None):
        heads = cfg.n_key_value_heads
    sizes = {"layer": cfg.n_layers, "pos": pos, "src_pos": pos, "dest_pos": pos}
    sizes |= {"head": heads, "head_index": heads}
    return [sizes[axis] for axis in axes]


def _attribution(
    model: Any,
    body: dict[str, Any],
    rows: list[tuple[int, ...]],
    explicit: bool,
    tokens: torch.Tensor,
    metric: Metricish,
) -> torch.Tensor:
    """One request answers every row: the backward is shared, rows only pick slices."""
    shape = (*tokens.shape, model.cfg.d_vocab_out)
    request = {
        **body,
        "method": "attribution",
        "metric": objective_wire(metric, shape, model.cfg.dtype),
    }
    if explicit:
        request["index"] = [list(row) for row in rows]
    _, tensors = model._transport.frames("POST", "/v1/patching", request, progress=False)
    return _per_row(tensors)


def _per_row(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``patching.metric`` as one value per index row, in row order (the server shapes it as
    the sweep: [layer, pos, …] for every combination, [rows] for explicit rows)."""
    return tensors["patching.metric"].reshape(-1)


def _chunks(rows: list[tuple[int, ...]], size: int) -> list[list[tuple[int, ...]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _sweep(
    model: Any, body: dict[str, Any], chunks: list[list[tuple[int, ...]]], progress: bool
) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    answers = []
    bar = tqdm(
        total=sum(map(len, chunks)), desc="patching", disable=not progress or len(chunks) < 2
    )
    try:
        for chunk in chunks:
            request = {**body, "index": [list(row) for row in chunk]}
            answers.append(model._transport.frames("POST", "/v1/patching", request, progress=False))
            bar.update(len(chunk))
    finally:
        bar.close()
    return answers


def _declarative(
    model: Any, body: dict[str, Any], rows: list[tuple[int, ...]], metric: Metric, progress: bool
) -> torch.Tensor:
    size = max(MIN_ROWS_PER_REQUEST, math.ceil(len(rows) / 20))
    body = {**body, "metric": metric.to_wire()}
    if metric.normalize and metric.baselines is None and len(rows) > size:
        # Measure the baselines once, so every request normalises by the same values.
        meta, _ = model._transport.frames(
            "POST", "/v1/patching", {**body, "index": [list(rows[0])]}, progress=False
        )
        body["metric"] = {**body["metric"], "baselines": meta["baselines"]}
    answers = _sweep(model, body, _chunks(rows, size), progress)
    return torch.cat([_per_row(tensors) for _, tensors in answers])


def _callable(
    model: Any,
    body: dict[str, Any],
    rows: list[tuple[int, ...]],
    tokens: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    progress: bool,
) -> torch.Tensor:
    base = model.forward(tokens).float()  # the corrupted run: the probe, and the filler
    positions = _positions_read(metric, base)
    try:  # traced, the metric runs on the server and only its values come back
        graph = trace(metric, "metric", base.shape, model.cfg.dtype, metric=True).graph
    except Untraceable:
        graph = None
    if graph is not None:
        traced = {**body, "metric": {"kind": "graph", "graph": graph, "positions": positions}}
        size = max(MIN_ROWS_PER_REQUEST, math.ceil(len(rows) / 20))
        answers = _sweep(model, traced, _chunks(rows, size), progress)
        return torch.cat([_per_row(tensors) for _, tensors in answers])
    per_row = tokens.shape[0] * len(positions) * base.shape[-1] * 4
    limit = min(MAX_LOGITS_BYTES, int(model.info["limits"]["max_response_bytes"]) // 2)
    body = {**body, "metric": {"kind": "logits", "positions": positions}}
    values = []
    for _, tensors in _sweep(model, body, _chunks(rows, max(1, limit // per_row)), progress):
        for patched in tensors["patching.logits"]:
            logits = base.clone()
            logits[:, positions] = patched.float()
            values.append(float(metric(logits)))
    return torch.tensor(values)


def _positions_read(
    metric: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor
) -> list[int]:
    """The positions whose logits the metric depends on (its gradient is non-zero there); every
    position when that cannot be told (no gradient flows, or the metric refuses autograd)."""
    everything = list(range(logits.shape[1]))
    probe = logits.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            value = metric(probe)
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                return everything
            (grad,) = torch.autograd.grad(value.sum(), probe, allow_unused=True)
    except (RuntimeError, TypeError, ValueError):
        return everything
    if grad is None:
        return everything
    used = grad.abs().sum(dim=(0, 2)).nonzero().flatten().tolist()
    return used or everything


class _CleanSource:
    """The request fields naming the clean activations; uploads (and afterwards deletes) those
    of a client-side cache."""

    def __init__(self, model: Any, clean_cache: Any, activation: str, layers: set[int]) -> None:
        self.model = model
        self.uploaded: list[str] = []
        cache_id = clean_cache if isinstance(clean_cache, str) else None
        cache_id = cache_id or getattr(clean_cache, "cache_id", None)
        if cache_id is not None:
            self.body: dict[str, Any] = {"clean_cache": cache_id}
            return
        template = PATCH_ACTIVATIONS[activation]
        names = [template.format(layer=layer) for layer in sorted(layers)]
        names.append("blocks.0.hook_resid_pre")  # lets the server measure normalize baselines
        refs = {}
        for name in dict.fromkeys(names):
            if name not in clean_cache:
                if name == "blocks.0.hook_resid_pre":
                    continue
                raise KeyError(f"clean_cache has no {name!r}")
            value = clean_cache[name]
            if getattr(clean_cache, "has_batch_dim", True) is False:
                value = value[None]
            refs[name] = {"ref": model.store_tensor(value)}
            self.uploaded.append(refs[name]["ref"])
        self.body = {"clean_activations": refs}

    def __enter__(self) -> _CleanSource:
        return self

    def __exit__(self, *exc: object) -> None:
        for ref in self.uploaded:
            # Best effort: the store's TTL frees anything left behind.
            with contextlib.suppress(Exception):
                self.model.delete_stored(ref)


# --- the specialised functions (TransformerLens's partials) -----------------------------------

get_act_patch_resid_pre = partial(
    generic_activation_patch, patch_setter=layer_pos_patch_setter,
    activation_name="resid_pre", index_axis_names=("layer", "pos"),
)  # fmt: skip
get_act_patch_resid_mid = partial(
    generic_activation_patch, patch_setter=layer_pos_patch_setter,
    activation_name="resid_mid", index_axis_names=("layer", "pos"),
)  # fmt: skip
get_act_patch_attn_out = partial(
    generic_activation_patch, patch_setter=layer_pos_patch_setter,
    activation_name="attn_out", index_axis_names=("layer", "pos"),
)  # fmt: skip
get_act_patch_mlp_out = partial(
    generic_activation_patch, patch_setter=layer_pos_patch_setter,
    activation_name="mlp_out", index_axis_names=("layer", "pos"),
)  # fmt: skip


def _by_pos(activation: str) -> partial[Any]:
    return partial(
        generic_activation_patch, patch_setter=layer_pos_head_vector_patch_setter,
        activation_name=activation, index_axis_names=("layer", "pos", "head"),
    )  # fmt: skip


def _all_pos(activation: str) -> partial[Any]:
    return partial(
        generic_activation_patch, patch_setter=layer_head_vector_patch_setter,
        activation_name=activation, index_axis_names=("layer", "head"),
    )  # fmt: skip


get_act_patch_attn_head_out_by_pos = _by_pos("z")
get_act_patch_attn_head_q_by_pos = _by_pos("q")
get_act_patch_attn_head_k_by_pos = _by_pos("k")
get_act_patch_attn_head_v_by_pos = _by_pos("v")
get_act_patch_attn_head_out_all_pos = _all_pos("z")
get_act_patch_attn_head_q_all_pos = _all_pos("q")
get_act_patch_attn_head_k_all_pos = _all_pos("k")
get_act_patch_attn_head_v_all_pos = _all_pos("v")
get_act_patch_attn_head_pattern_by_pos = partial(
    generic_activation_patch, patch_setter=layer_head_pos_pattern_patch_setter,
    activation_name="pattern", index_axis_names=("layer", "head_index", "dest_pos"),
)  # fmt: skip
get_act_patch_attn_head_pattern_dest_src_pos = partial(
    generic_activation_patch, patch_setter=layer_head_dest_src_pos_pattern_patch_setter,
    activation_name="pattern", index_axis_names=("layer", "head_index", "dest_pos", "src_pos"),
)  # fmt: skip
get_act_patch_attn_head_pattern_all_pos = partial(
    generic_activation_patch, patch_setter=layer_head_pattern_patch_setter,
    activation_name="pattern", index_axis_names=("layer", "head_index"),
)  # fmt: skip


def _pad_heads(results: torch.Tensor, heads: int) -> torch.Tensor:
    """k/v results of a grouped-query model have fewer heads: zero-pad them, as TL does."""
    return torch.nn.functional.pad(results, (0, heads - results.shape[-1]))


def get_act_patch_attn_head_all_pos_every(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    metric: Metricish,
    *,
    method: Method = "activation",
) -> torch.Tensor:
    """Every head (all positions) for out, q, k, v, pattern: ``[5, n_layers, n_heads]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    out = get_act_patch_attn_head_out_all_pos(*args, method=method)
    q = get_act_patch_attn_head_q_all_pos(*args, method=method)
    k = _pad_heads(get_act_patch_attn_head_k_all_pos(*args, method=method), q.shape[-1])
    v = _pad_heads(get_act_patch_attn_head_v_all_pos(*args, method=method), q.shape[-1])
    pattern = get_act_patch_attn_head_pattern_all_pos(*args, method=method)
    return torch.stack([out, q, k, v, pattern])


def get_act_patch_attn_head_by_pos_every(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    metric: Metricish,
    *,
    method: Method = "activation",
) -> torch.Tensor:
    """Every head by position for out, q, k, v, pattern: ``[5, n_layers, pos, n_heads]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    out = get_act_patch_attn_head_out_by_pos(*args, method=method)
    q = get_act_patch_attn_head_q_by_pos(*args, method=method)
    k = _pad_heads(get_act_patch_attn_head_k_by_pos(*args, method=method), q.shape[-1])
    v = _pad_heads(get_act_patch_attn_head_v_by_pos(*args, method=method), q.shape[-1])
    pattern = get_act_patch_attn_head_pattern_by_pos(*args, method=method)
    pattern = pattern.transpose(1, 2)  # [L, pos, head]
    return torch.stack([out, q, k, v, pattern])


def get_act_patch_block_every(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    metric: Metricish,
    *,
    method: Method = "activation",
) -> torch.Tensor:
    """resid_pre, attn_out and mlp_out by position: ``[3, n_layers, pos]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return torch.stack(
        [
            get_act_patch_resid_pre(*args, method=method),
            get_act_patch_attn_out(*args, method=method),
            get_act_patch_mlp_out(*args, method=method),
        ]
    )


# --- attribution patching: the same functions, estimated from one backward ----------------------

generic_attribution_patch = partial(generic_activation_patch, method="attribution")
get_attr_patch_resid_pre = partial(get_act_patch_resid_pre, method="attribution")
get_attr_patch_resid_mid = partial(get_act_patch_resid_mid, method="attribution")
get_attr_patch_attn_out = partial(get_act_patch_attn_out, method="attribution")
get_attr_patch_mlp_out = partial(get_act_patch_mlp_out, method="attribution")
get_attr_patch_attn_head_out_by_pos = partial(
    get_act_patch_attn_head_out_by_pos, method="attribution"
)
get_attr_patch_attn_head_q_by_pos = partial(get_act_patch_attn_head_q_by_pos, method="attribution")
get_attr_patch_attn_head_k_by_pos = partial(get_act_patch_attn_head_k_by_pos, method="attribution")
get_attr_patch_attn_head_v_by_pos = partial(get_act_patch_attn_head_v_by_pos, method="attribution")
get_attr_patch_attn_head_out_all_pos = partial(
    get_act_patch_attn_head_out_all_pos, method="attribution"
)
get_attr_patch_attn_head_q_all_pos = partial(
    get_act_patch_attn_head_q_all_pos, method="attribution"
)
get_attr_patch_attn_head_k_all_pos = partial(
    get_act_patch_attn_head_k_all_pos, method="attribution"
)
get_attr_patch_attn_head_v_all_pos = partial(
    get_act_patch_attn_head_v_all_pos, method="attribution"
)
get_attr_patch_attn_head_pattern_by_pos = partial(
    get_act_patch_attn_head_pattern_by_pos, method="attribution"
)
get_attr_patch_attn_head_pattern_dest_src_pos = partial(
    get_act_patch_attn_head_pattern_dest_src_pos, method="attribution"
)
get_attr_patch_attn_head_pattern_all_pos = partial(
    get_act_patch_attn_head_pattern_all_pos, method="attribution"
)
get_attr_patch_attn_head_all_pos_every = partial(
    get_act_patch_attn_head_all_pos_every, method="attribution"
)
get_attr_patch_attn_head_by_pos_every = partial(
    get_act_patch_attn_head_by_pos_every, method="attribution"
)
get_attr_patch_block_every = partial(get_act_patch_block_every, method="attribution")


__all__ = [
    "generic_activation_patch",
    "generic_attribution_patch",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_pre",
    "get_attr_patch_attn_head_all_pos_every",
    "get_attr_patch_attn_head_by_pos_every",
    "get_attr_patch_attn_head_k_all_pos",
    "get_attr_patch_attn_head_k_by_pos",
    "get_attr_patch_attn_head_out_all_pos",
    "get_attr_patch_attn_head_out_by_pos",
    "get_attr_patch_attn_head_pattern_all_pos",
    "get_attr_patch_attn_head_pattern_by_pos",
    "get_attr_patch_attn_head_pattern_dest_src_pos",
    "get_attr_patch_attn_head_q_all_pos",
    "get_attr_patch_attn_head_q_by_pos",
    "get_attr_patch_attn_head_v_all_pos",
    "get_attr_patch_attn_head_v_by_pos",
    "get_attr_patch_block_every",
    "get_attr_patch_mlp_out",
    "get_attr_patch_resid_mid",
    "get_attr_patch_resid_pre",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "make_df_from_ranges",
]
