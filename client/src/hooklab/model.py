"""``HookedTransformer`` for a remote hooklab server, with TransformerLens's API.

Hook functions are declarative specs (``hooklab.hooks``) that run on the server; activations
come back as tensors. Weights are fetched on first use and memoised.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from hooklab_proto import (
    IG_ATTRIBUTIONS,
    OUTPUT_LOGITS,
    OUTPUT_LOSS,
    OUTPUT_OBJECTIVE,
    OUTPUT_RESIDUAL,
    OUTPUT_VALUE,
    TOP_K_VALUES_SUFFIX,
    WireDtype,
)

from . import tokenizer as tokenization
from ._transport import Transport
from .activation_cache import ActivationCache
from .callbacks import CallbackSession
from .config import HookedTransformerConfig
from .errors import (
    ConnectionFailedError,
    NotFoundError,
    QuotaError,
    ServerError,
    StoreFullError,
)
from .function_hooks import FunctionHooks, HookMode, ShapePlan, axis_sizes, default_mode
from .hooks import HookSpec
from .lazy import LazyLogits
from .metrics import Metric, objective_wire
from .modules import Circuits, HookPoint, LazyStateDict, Module, Weights, build_tree
from .remote_cache import RemoteEntries
from .sparse import gather_top_k, last_axis_sizes
from .tokenizer import PaddingSide, Tokenizer, TokensLike
from .uploaded_saes import UploadedSae, upload_body, with_points

NameOrFilter = str | Callable[[str], bool]
HookFunction = Callable[..., Any]  # TransformerLens's fn(activation, hook)
FwdHook = tuple[NameOrFilter, HookSpec | HookFunction]
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
# The default of model.lazy_cache_bytes: a cache above this stays on the server until read.
LAZY_CACHE_BYTES = 64 * 2**20
# A backward pass's objective: a hooklab.metrics metric, or a Python metric of the logits.
MetricLike = Metric | Callable[[torch.Tensor], torch.Tensor]
Direction = Literal["fwd", "bwd"]


# The hook points each of TransformerLens's use_* switches makes fire.
_SWITCHED_HOOKS: dict[str, tuple[str, ...]] = {
    "use_attn_result": ("attn.hook_result",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_hook_mlp_in": ("hook_mlp_in",),
    "use_attn_in": ("hook_attn_in",),
}


class IntegratedGradients(NamedTuple):
    """``model.integrated_gradients``: attributions shaped as the activation, the metric at the
    input and at the baseline, and ``sum(attributions) - (value - baseline_value)``."""

    attributions: torch.Tensor
    value: float
    baseline_value: float
    convergence_delta: float


class Output(SimpleNamespace):
    """``return_type="both"``: ``(logits, loss)``, unpackable like TransformerLens's Output."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.logits, self.loss))


def _check_hook(hook: object) -> HookSpec | HookFunction:
    if isinstance(hook, HookSpec) or callable(hook):
        return hook
    raise TypeError(
        f"a hook must be a function fn(activation, hook) or a hooklab.hooks spec, not "
        f"{type(hook).__name__}"
    )


class HookedTransformer(Circuits):
    """A model served by ``hooklab-server``; see :meth:`from_server`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        info = transport.get_json("/v1/model")
        # Pinned: a server serving several models keeps answering with this one.
        transport.model = info["model_name"]
        self.info = info
        self.cfg = HookedTransformerConfig.from_server(info["cfg"])
        self.hook_names: list[str] = [point["name"] for point in info["hook_points"]]
        self._fires = {point["name"]: point["fires_by_default"] for point in info["hook_points"]}
        self._fires_by_default = dict(self._fires)  # set_use_attn_result & co. change _fires
        # Uploaded SAEs attached to this client's requests (add_sae), and the names without them.
        self._attached: list[UploadedSae] = []
        self._model_hook_names = list(self.hook_names)
        self._weights = Weights(self._fetch_weight)
        # Hooks added with add_hook / hooks(): forward, backward, and which are permanent.
        self._hooks: list[FwdHook] = []
        self._bwd_hooks: list[FwdHook] = []
        self._permanent: set[int] = set()
        self.hook_mode: HookMode = default_mode()  # "auto" | "traced" | "callback"
        # How long the server waits for one callback's reply before it stops the forward.
        self.callback_timeout_s = 300.0
        # run_with_hooks returns logits computed on first read, sending back only what is read.
        self.lazy_logits = True
        # run_with_cache keeps a cache larger than this on the server, read when indexed.
        self.lazy_cache_bytes = LAZY_CACHE_BYTES
        # "float16" | "bfloat16": activations and logits travel in that dtype (half the bytes,
        # rounded: proto's WireDtype) and are float32 here again; None: exact.
        self.wire_dtype: WireDtype | None = None
        self._callbacks: CallbackSession | None = None
        self._functions = FunctionHooks(
            info["cfg"],
            {point["name"]: point["shape"] for point in info["hook_points"]},
            self.cfg.dtype,
            self._callback_session,
            lambda name: self.hook_dict[name],
        )
        self._tokenizer: Tokenizer | None = None  # built from the server's files on first use
        # TransformerLens's module tree: model.blocks[0].attn.hook_z, model.embed.W_E, ...
        self._root, self.hook_dict = build_tree(self, self.hook_names, self.cfg, self._weights)
        self.mod_dict: dict[str, Module | HookPoint] = dict(self._root.named_modules())
        for name, child in self._root.named_children():
            setattr(self, name, child)

    @classmethod
    def from_server(
        cls,
        url: str,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        model: str | None = None,
    ) -> HookedTransformer:
        """Connect to a hooklab server (e.g. ``http://gpu-box:8000``). ``api_key`` defaults to
        the ``HOOKLAB_API_KEY`` environment variable; a server without keys needs none.
        ``model`` picks one of the models the server serves (``GET /v1/models``); by default
        the server's first. ``HOOKLAB_HTTP_TRANSPORT=httpx`` makes requests go through httpx's
        own transport rather than the client's socket transport (which reads tensors straight
        into their buffers)."""
        return cls(Transport(url, api_key, timeout, model))

    def close(self) -> None:
        if self._callbacks is not None:
            self._callbacks.close()
        self._transport.close()

    # --- requests -------------------------------------------------------------------------

    def _specs(
        self, fwd_hooks: Sequence[FwdHook], plan: Callable[[], ShapePlan], dir: Direction = "fwd"
    ) -> list[dict[str, Any]]:
        """The wire hook entries of the added hooks of ``dir`` and then ``fwd_hooks``: specs as
        they are, functions traced (``plan`` gives the activation shapes, worked out only when a
        function needs them). A backward hook gets the gradient, shaped as its activation."""
        specs: list[dict[str, Any]] = []
        shapes: ShapePlan | None = None
        added = self._hooks if dir == "fwd" else self._bwd_hooks
        for selector, hook in [*added, *fwd_hooks]:
            hook = _check_hook(hook)
            if isinstance(selector, str):
                names = [selector]
            else:  # like TransformerLens: a predicate sees the hook points that fire
                names = [name for name in self.hook_names if self._fires[name] and selector(name)]
            for name in names:
                if isinstance(hook, HookSpec):
                    specs.append(hook.at(name))
                    continue
                if name not in self._fires:
                    raise KeyError(f"unknown hook point {name!r}")
                shapes = shapes or plan()
                specs.append(self._functions.entry(name, hook, shapes, self.hook_mode))
        return specs

    def _shape_plan(self, input: Any, generation: bool = False, **options: Any) -> ShapePlan:
        """The batch and positions an input makes (tokenised here, as the server will)."""
        if options.get("start_at_layer") is not None or isinstance(input, torch.Tensor):
            shape = torch.as_tensor(input).shape
            batch, pos = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        else:
            tokens = self.to_tokens(input, options.get("prepend_bos"), options.get("padding_side"))
            batch, pos = tokens.shape
        return ShapePlan(int(batch), int(pos), generation, options.get("use_past_kv_cache", True))

    def _callback_session(self) -> CallbackSession:
        if self._callbacks is None or not self._callbacks.alive:  # opened again after a drop
            self._callbacks = CallbackSession(self._transport, self._functions.hook_of)
        self._callbacks.timeout_s = self.callback_timeout_s
        return self._callbacks

    @contextmanager
    def _running(self, hooks: list[dict[str, Any]]) -> Iterator[None]:
        """Around a request with hook entries: its callbacks are dropped afterwards, and a hook
        function that raised on this machine is re-raised as itself."""
        try:
            yield
        except ServerError as exc:
            failure = self._callbacks.failure if self._callbacks is not None else None
            if exc.code == "callback_failed" and failure is not None:
                self._callbacks.failure = None  # type: ignore[union-attr]
                raise failure from exc
            raise
        finally:
            if self._callbacks is not None:
                self._callbacks.forget(hooks)

    def _body(self, input: Any, **kwargs: Any) -> dict[str, Any]:
        # None means "server default", except for return_type where None is a real choice.
        body: dict[str, Any] = {
            key: value for key, value in kwargs.items() if value is not None or key == "return_type"
        }
        if kwargs.get("start_at_layer") is not None:
            body["residual"] = input
        elif isinstance(input, torch.Tensor):
            body["input"] = input if input.dim() == 2 else input.unsqueeze(0)
        else:
            body["input"] = input
        for key in ("tokens", "attention_mask"):
            if isinstance(body.get(key), torch.Tensor):
                body[key] = body[key].long()
        if self._attached:
            body["saes"] = [sae.id for sae in self._attached]
        return body

    def _resolve_names(self, names_filter: NamesFilter) -> list[str] | None:
        if names_filter is None:
            if self._fires == self._fires_by_default:
                return None  # the server's default: every hook point that fires
            return [name for name in self.hook_names if self._fires[name]]
        if isinstance(names_filter, str):
            return [names_filter]
        if callable(names_filter):
            # Evaluated here, over the hook points that fire: only the names travel.
            return [name for name in self.hook_names if self._fires[name] and names_filter(name)]
        return list(names_filter)

    def _call(
        self, path: str, args: tuple[Any, ...], fwd_hooks: Sequence[FwdHook],
        names: list[str] | None, *, bwd_hooks: Sequence[FwdHook] = (),
        metric: MetricLike | None = None, incl_bwd: bool = False, **kwargs: Any,
    ) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
        if len(args) != 1:
            raise TypeError(f"expected one positional argument (the input), got {len(args)}")
        plan = _once(lambda: self._shape_plan(args[0], **kwargs))
        hooks = self._specs(fwd_hooks, plan)
        body = self._body(args[0], hooks=hooks, **kwargs)
        backward = incl_bwd or metric is not None
        callbacks = hooks
        if backward or bwd_hooks:  # the added backward hooks run only with a backward pass
            callbacks = hooks + self._backward_fields(body, plan, bwd_hooks, metric, incl_bwd)
        if path != "/v1/forward":
            body["names"] = names
        if self.wire_dtype is not None:
            body["wire_dtype"] = self.wire_dtype
        with self._running(callbacks):
            meta, tensors = self._transport.frames("POST", path, body)
        tensors = {name: self._from_the_wire(value) for name, value in tensors.items()}
        outputs = {name: tensors.pop(name) for name in list(tensors) if name.startswith("output.")}
        if "entries" in meta and kwargs.get("lazy"):  # the cache and its logits stayed there
            ttl = self.info["limits"].get("store_ttl_s")
            remote, kept = RemoteEntries.on_server(
                self._transport, meta["cache_id"], meta["entries"], ttl,
                bool(kwargs.get("store")), self.wire_dtype,
            )  # fmt: skip
            meta["remote_entries"] = remote
            outputs.update(kept)
        meta["objective"] = outputs.get(OUTPUT_OBJECTIVE)
        return _output(outputs, kwargs), tensors, meta

    def _from_the_wire(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor sent as ``wire_dtype``, back in the model's dtype (its rounding stays)."""
        if self.wire_dtype is None or not value.is_floating_point():
            return value
        return value.to(self.cfg.dtype)

    def _backward_fields(
        self,
        body: dict[str, Any],
        plan: Callable[[], ShapePlan],
        bwd_hooks: Sequence[FwdHook],
        metric: MetricLike | None,
        incl_bwd: bool = False,
    ) -> list[dict[str, Any]]:
        """Adds a backward pass to a request body: its objective (None: the loss), backward
        hooks and gradient captures. Returns the backward hook entries."""
        entries = self._specs(bwd_hooks, plan, "bwd")
        if entries:
            body["bwd_hooks"] = entries
        if metric is not None:
            shapes = plan()
            shape = (shapes.batch, shapes.pos, self.cfg.d_vocab_out)
            body["objective"] = objective_wire(metric, shape, self.cfg.dtype)
        if incl_bwd:
            body["incl_bwd"] = True
        return entries

    def forward(
        self,
        input: str | list[str] | torch.Tensor,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        start_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
    ) -> Any:
        """TransformerLens's ``forward``, run on the server under any hooks added here. With
        backward hooks added (``add_hook(..., dir="bwd")``) the output comes back lazily, so
        that ``.backward()`` on a scalar computed from it runs the backward on the server (the
        pattern of TransformerLens's attribution-patching demo)."""
        if self._bwd_hooks and return_type in ("logits", "loss") and stop_at_layer is None:
            options = {
                "return_type": return_type, "prepend_bos": prepend_bos,
                "padding_side": padding_side, "attention_mask": attention_mask,
            }  # fmt: skip
            if start_at_layer is None and not loss_per_token:
                given = {key: value for key, value in options.items() if value is not None}
                return self._deferred(input, (), (), True, given)
        out, _, _ = self._call(
            "/v1/forward", (input,), (), None, return_type=return_type,
            loss_per_token=loss_per_token, prepend_bos=prepend_bos, padding_side=padding_side,
            start_at_layer=start_at_layer, tokens=tokens, attention_mask=attention_mask,
            stop_at_layer=stop_at_layer,
        )  # fmt: skip
        return out

    __call__ = forward

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        incl_bwd: bool = False,
        store: bool = False,
        fwd_hooks: Sequence[FwdHook] = (),
        metric: MetricLike | None = None,
        lazy: bool | None = None,
        sparse_top_k: int | dict[str, Any] | None = None,
        **forward_kwargs: Any,
    ) -> tuple[Any, ActivationCache | MutableMapping[str, torch.Tensor]]:
        """Forward plus activations. ``store=True`` also keeps the cache on the server: its id
        is ``cache.cache_id`` (usable as a patch source).

        ``incl_bwd=True``: the server also runs the backward pass, from the output as in
        TransformerLens (``return_type="loss"``) or from ``metric`` (a ``hooklab.metrics``
        metric or a traceable Python metric of the logits), with the backward hooks added by
        ``add_hook(..., dir="bwd")``; the cache then holds ``{name}_grad`` for every name
        cached (``cache.gradients()`` is them as a cache of their own).

        ``lazy``: the activations stay on the server and each travels when first read (its
        names, shapes and dtypes are here at once; analysis methods bring what they read in
        one request) — ``hooklab.remote_cache``. None (the default): lazy when the cache would
        be larger than ``model.lazy_cache_bytes``. ``cache.release()`` frees the server copy;
        so does dropping the cache, and the store's time to live.

        ``sparse_top_k``: an int k, or ``{"k": k, "names": [...]}`` — the server sends those
        cached points (default: every SAE ``hook_sae_acts_pre``/``hook_sae_acts_post``) as
        their top k along the last axis, and ``cache[name]`` is a ``hooklab.sparse.TopK``
        (``.values``, ``.indices`` as ``torch.topk`` gives them; ``.to_dense()``). Not lazy."""
        names = self._resolve_names(names_filter)
        chosen = lazy
        top_k = {"k": sparse_top_k} if isinstance(sparse_top_k, int) else sparse_top_k
        if top_k is not None:
            forward_kwargs["sparse_top_k"] = top_k
            lazy = bool(lazy)  # a lazy cache keeps the dense activations
        if lazy is None:
            plan = self._shape_plan(model_args[0], **forward_kwargs) if len(model_args) else None
            lazy = plan is not None and self._cache_bytes(names, plan) > self.lazy_cache_bytes
        call = functools.partial(
            self._call, "/v1/run_with_cache", model_args, fwd_hooks, names,
            remove_batch_dim=remove_batch_dim or None, store=store or None, incl_bwd=incl_bwd,
            metric=metric, **forward_kwargs,
        )  # fmt: skip
        try:
            out, tensors, meta = call(lazy=True) if lazy else call()
        except (StoreFullError, QuotaError) as full:
            if chosen is not None:
                raise
            warnings.warn(
                f"hooklab: this cache came here whole: the server could not keep it ({full})",
                stacklevel=2,
            )
            lazy = False
            out, tensors, meta = call()
        entries: MutableMapping[str, torch.Tensor] = tensors
        if top_k is not None:
            entries = self._top_k_entries(tensors, model_args[0], forward_kwargs)
        if lazy:  # nothing cached (names matching no hook point): nothing was kept there
            entries = meta.get("remote_entries", tensors)
            lazy = isinstance(entries, RemoteEntries)
        cache = ActivationCache(entries, self, has_batch_dim=not (remove_batch_dim and not lazy))
        if lazy and remove_batch_dim:
            cache.remove_batch_dim()
        if device is not None:
            cache.to(device)
        cache.cache_id = meta.get("cache_id")
        return out, (cache if return_cache_object else cache.cache_dict)

    def _top_k_entries(
        self, tensors: dict[str, torch.Tensor], input: Any, options: dict[str, Any]
    ) -> dict[str, Any]:
        """The cache's entries with each top-k pair joined into one ``TopK``."""
        plan = self._shape_plan(input, **options)
        sizes = axis_sizes(self.info["cfg"], plan.batch, plan.pos)
        # Every SAE's feature axis, those of SAEs attached to this client's requests too.
        sizes.update((f"d_sae[{hook}]", width) for hook, width in self.saes.items())
        shapes = {point["name"]: point["shape"] for point in self.info["hook_points"]}
        sent = [name.removesuffix(TOP_K_VALUES_SUFFIX) for name in tensors]
        sparse = [name for name in sent if name + TOP_K_VALUES_SUFFIX in tensors]
        return gather_top_k(tensors, last_axis_sizes(shapes, sizes, sparse))

    def _cache_bytes(self, names: list[str] | None, plan: ShapePlan) -> int:
        """The bytes of the activations ``names`` (None: every point that fires) of an input."""
        sizes = axis_sizes(self.info["cfg"], plan.batch, plan.pos)
        shapes = {point["name"]: point["shape"] for point in self.info["hook_points"]}
        chosen = names if names is not None else [n for n in self.hook_names if self._fires[n]]
        elements = sum(
            math.prod(sizes.get(str(a), a) for a in shapes[n]) for n in chosen if n in shapes
        )
        return int(elements) * self.cfg.dtype.itemsize

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[FwdHook] = (),
        bwd_hooks: Sequence[FwdHook] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        metric: MetricLike | None = None,
        **forward_kwargs: Any,
    ) -> Any:
        """TransformerLens's ``run_with_hooks``. With Python hook functions, all traced, the
        logits come back lazily (``lazy_logits``): the forward runs when they are first read
        (its errors are raised then), and only what is read (e.g. a metric's value) is sent
        back. With specs alone, or a callback among the hooks, it runs at once.

        Backward hooks run on the server during a backward pass: with ``metric`` (hooklab's
        argument) the call runs it at once, from that metric of the logits; without, the
        output comes back lazily and ``.backward()`` on a scalar computed from it (e.g.
        ``metric(logits).backward()``) runs the forward and backward there, with these
        backward hooks (in TransformerLens they survive only with ``reset_hooks_end=False``;
        here they belong to the call). ``reset_hooks_end`` and ``clear_contexts`` are accepted
        for compatibility: hooks passed here apply to this call only."""
        del reset_hooks_end
        if clear_contexts:
            self.clear_contexts()
        if metric is not None:
            out, _, _ = self._call(
                "/v1/run_with_hooks", model_args, fwd_hooks, [], bwd_hooks=bwd_hooks,
                metric=metric, **forward_kwargs,
            )  # fmt: skip
            return out
        backward = bool(bwd_hooks or self._bwd_hooks)
        deferrable = (
            (self.lazy_logits or backward)
            and len(model_args) == 1
            and forward_kwargs.get("return_type", "logits") in ("logits", "loss")
            and forward_kwargs.get("stop_at_layer") is None
            and forward_kwargs.get("start_at_layer") is None
        )
        if not deferrable:
            out, _, _ = self._call(
                "/v1/run_with_hooks", model_args, fwd_hooks, [], **forward_kwargs
            )
            return out
        return self._deferred(model_args[0], fwd_hooks, bwd_hooks, backward, forward_kwargs)

    def _deferred(
        self,
        input: Any,
        fwd_hooks: Sequence[FwdHook],
        bwd_hooks: Sequence[FwdHook],
        backward: bool,
        forward_kwargs: dict[str, Any],
    ) -> Any:
        """A forward whose output stays on the server until read (LazyLogits); with
        ``backward``, one whose ``.backward()`` runs there too."""
        plan = _once(lambda: self._shape_plan(input, **forward_kwargs))
        wants_loss = forward_kwargs.get("return_type", "logits") == "loss"
        options = {**forward_kwargs, "return_type": "logits"}
        hooks = self._specs(fwd_hooks, plan)
        callbacks = any(entry.get("op") == "callback" for entry in hooks)
        traced = any(entry.get("op") == "graph" for entry in hooks)
        if not backward and (wants_loss or not traced or callbacks):
            # Nothing to gain from waiting: the forward runs now.
            body = self._body(input, hooks=hooks, **forward_kwargs)
            body["names"] = []
            with self._running(hooks):
                _, tensors = self._transport.frames("POST", "/v1/run_with_hooks", body)
            return tensors[OUTPUT_LOSS if wants_loss else OUTPUT_LOGITS]
        body = self._body(input, hooks=hooks, **options)
        body["names"] = []
        entries = self._specs(bwd_hooks, plan, "bwd") if backward else []

        def fetch(graph: dict[str, Any] | None, with_backward: bool = False) -> torch.Tensor:
            sent = dict(body)
            if with_backward:
                assert graph is not None
                sent["objective"] = {"kind": "graph", "graph": graph}
                if entries:
                    sent["bwd_hooks"] = entries
            elif graph is not None:
                sent["logits_graph"] = graph
            with self._running(hooks + entries):
                _, tensors = self._transport.frames(
                    "POST", "/v1/run_with_hooks", sent, progress=False
                )
            if with_backward:
                return tensors[OUTPUT_OBJECTIVE]
            return tensors[OUTPUT_VALUE if graph is not None else OUTPUT_LOGITS]

        shapes = plan()
        shape = (shapes.batch, shapes.pos, self.cfg.d_vocab_out)
        logits = LazyLogits.of(fetch, shape, self.cfg.dtype)
        if not wants_loss:
            return logits
        tokens = input if isinstance(input, torch.Tensor) else self.to_tokens(input)
        tokens = tokens if tokens.dim() == 2 else tokens[None]
        return self.loss_fn(logits, tokens, forward_kwargs.get("attention_mask"))

    def integrated_gradients(
        self,
        input: str | list[str] | torch.Tensor,
        metric: MetricLike,
        hook: str = "hook_embed",
        steps: int = 50,
        baseline: torch.Tensor | None = None,
        baseline_input: str | list[str] | torch.Tensor | None = None,
        positions: Sequence[int] | None = None,
        prepend_bos: bool | None = None,
    ) -> IntegratedGradients:
        """Integrated gradients of ``metric`` (a ``hooklab.metrics`` metric or a traceable
        Python metric of the logits) with respect to the activation at ``hook``, computed on
        the server: ``(x - x') * mean over the path of the gradient``, ``steps`` midpoints from
        the baseline ``x'`` (zeros, ``baseline``, or the activation of ``baseline_input``) to
        the input's ``x``. ``positions`` limits the path to a span of positions (an input span,
        with the default ``hook_embed``). The attributions are shaped as the activation; their
        sum is close to ``value - baseline_value`` (``convergence_delta`` says how close)."""
        body: dict[str, Any] = {"input": self._body(input)["input"], "hook": hook, "steps": steps}
        plan = self._shape_plan(input, prepend_bos=prepend_bos)
        shape = (plan.batch, plan.pos, self.cfg.d_vocab_out)
        body["metric"] = objective_wire(metric, shape, self.cfg.dtype)
        if baseline_input is not None:
            body["baseline_input"] = self._body(baseline_input)["input"]
        optional = {"baseline": baseline, "positions": positions, "prepend_bos": prepend_bos}
        body.update({key: value for key, value in optional.items() if value is not None})
        if positions is not None:
            body["positions"] = [int(p) for p in positions]
        if self._attached:
            body["saes"] = [sae.id for sae in self._attached]
        meta, tensors = self._transport.frames("POST", "/v1/integrated_gradients", body)
        return IntegratedGradients(
            tensors[IG_ATTRIBUTIONS], float(meta["value"]), float(meta["baseline_value"]),
            float(meta["convergence_delta"]),
        )  # fmt: skip

    # --- generation -----------------------------------------------------------------------

    def _generate_body(
        self, input: Any, fwd_hooks: Sequence[FwdHook], **options: Any
    ) -> dict[str, Any]:
        body = {key: value for key, value in options.items() if value is not None}
        if isinstance(input, torch.Tensor):
            input = input if input.dim() == 2 else input.unsqueeze(0)
        body["input"] = input
        body["hooks"] = self._specs(
            fwd_hooks, lambda: self._shape_plan(input, generation=True, **options)
        )
        if self._attached:
            body["saes"] = [sae.id for sae in self._attached]
        return body

    def generate(
        self,
        input: str | list[str] | torch.Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: Literal["input", "str", "tokens", "embeds"] = "input",
        verbose: bool = True,
        seed: int | None = None,
        fwd_hooks: Sequence[FwdHook] = (),
    ) -> str | list[str] | torch.Tensor:
        """TransformerLens's ``generate`` on the server, under ``fwd_hooks`` and any hooks added
        here (steering a generation). ``verbose`` shows a progress bar as the steps arrive;
        ``generate_stream`` yields each step."""
        body = self._generate_body(
            input, fwd_hooks, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id, do_sample=do_sample, top_k=top_k, top_p=top_p,
            temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos,
            padding_side=padding_side, return_type=return_type, seed=seed, stream=verbose,
        )  # fmt: skip
        with self._running(body["hooks"]):
            if verbose:  # as TransformerLens: a progress bar of the steps (on stderr)
                result = None
                with tqdm(total=max_new_tokens) as bar:
                    for event, payload in self._transport.events("/v1/generate", body):
                        if event == "token":
                            bar.update(1)
                        elif event == "done":
                            result = payload
                if result is None:
                    raise ConnectionFailedError("the generation stream ended without a result")
            else:
                result = self._transport.post_json("/v1/generate", body)
        output = result["output"]
        if return_type == "embeds":
            return torch.tensor(output, dtype=self.cfg.dtype)
        if isinstance(output, list) and output and isinstance(output[0], list):
            return torch.tensor(output)
        text: str | list[str] = output
        return text

    def generate_stream(
        self,
        input: str | list[str] | torch.Tensor = "",
        max_new_tokens: int = 10,
        fwd_hooks: Sequence[FwdHook] = (),
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """Yield each step as it is generated: ``{"step", "tokens": [batch], "text": [batch]}``
        (tokens as a tensor). Stop iterating (or ``close()`` the iterator) to stop the server."""
        body = self._generate_body(
            input, fwd_hooks, max_new_tokens=max_new_tokens, stream=True, **options
        )
        with self._running(body["hooks"]):
            for event, payload in self._transport.events("/v1/generate", body):
                if event == "token":
                    yield {**payload, "tokens": torch.tensor(payload["tokens"])}

    # --- TransformerLens's switches for conditional hook points ----------------------------

    def _switch(self, flag: str, on: bool) -> None:
        setattr(self.cfg, flag, on)
        for name in self.hook_names:
            if name.endswith(_SWITCHED_HOOKS[flag]):
                self._fires[name] = on or self._fires_by_default[name]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Also compute (and cache) each head's output, ``attn.hook_result``."""
        self._switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self._switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        self._switch("use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self._switch("use_attn_in", use_attn_in)

    # --- hooks held client-side -----------------------------------------------------------

    def add_hook(
        self,
        name: NameOrFilter,
        hook: HookSpec | HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """TransformerLens's ``add_hook``: the hook applies to every later call, until
        ``reset_hooks`` (``is_permanent`` ones stay unless ``including_permanent``). A
        ``dir="bwd"`` hook gets the gradient at its point during a backward pass and may return
        a replacement (``level`` is accepted for compatibility)."""
        del level
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', not {dir!r}")
        entry = (name, _check_hook(hook))
        hooks = self._hooks if dir == "fwd" else self._bwd_hooks
        hooks.insert(0, entry) if prepend else hooks.append(entry)
        if is_permanent:
            self._permanent.add(id(entry))

    def add_perma_hook(
        self, name: NameOrFilter, hook: HookSpec | HookFunction, dir: Direction = "fwd"
    ) -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove the added hooks of ``direction`` (permanent ones only with
        ``including_permanent``), and clear every hook point's ``ctx``."""
        del level
        for dir, hooks in (("fwd", self._hooks), ("bwd", self._bwd_hooks)):
            if direction in (dir, "both"):
                kept = [e for e in hooks if not including_permanent and id(e) in self._permanent]
                hooks[:] = kept
        if clear_contexts:
            self.clear_contexts()

    def clear_contexts(self) -> None:
        for point in self.hook_dict.values():
            point.clear_context()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[FwdHook] = (),
        bwd_hooks: Sequence[FwdHook] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedTransformer]:
        """Apply ``fwd_hooks`` and ``bwd_hooks`` to every call inside the block
        (TransformerLens's ``hooks``)."""
        added = [
            (hooks, (name, _check_hook(hook)))
            for hooks, given in ((self._hooks, fwd_hooks), (self._bwd_hooks, bwd_hooks))
            for name, hook in given
        ]
        for hooks, entry in added:
            hooks.append(entry)
        try:
            yield self
        finally:
            if reset_hooks_end:
                for hooks, entry in added:
                    hooks.remove(entry)
            if clear_contexts:
                self.clear_contexts()

    # --- sparse autoencoders -------------------------------------------------------------

    @property
    def saes(self) -> dict[str, int]:
        """The sparse autoencoders served beside the model and those attached here with
        ``add_sae``: d_sae by the hook point each reads. Each adds the points
        ``{hook}.hook_sae_input`` … ``hook_sae_output`` (cached, patched and spec'd like any),
        and ``hooks.feature_steer`` etc. apply at ``hook``."""
        served = self.info["cfg"].get("sae_widths") or {}
        attached = {sae.hook: sae.d_sae for sae in self._attached}
        return {**{hook: int(width) for hook, width in served.items()}, **attached}

    def upload_sae(
        self, path: str | Path, hook: str | None = None, ttl_s: float | None = None
    ) -> UploadedSae:
        """Upload an SAE in SAELens's saved format (a folder with cfg.json and
        sae_weights.safetensors, as ``SAE.save_model`` writes) without attaching it. It is
        owned by this key, counts in its stored bytes and expires like a stored tensor."""
        info = self._transport.post_json("/v1/saes", upload_body(path, hook, ttl_s))
        return UploadedSae.from_server(info)

    def add_sae(
        self, sae: str | Path | UploadedSae, hook: str | None = None, ttl_s: float | None = None
    ) -> UploadedSae:
        """SAELens's ``HookedSAETransformer.add_sae``: ``sae`` (a SAELens folder, uploaded
        here, or an SAE uploaded before) is attached to every later request of this client
        until ``reset_saes``; its points join ``hook_names``. ``hook``: the point it reads,
        when not its cfg.json's ``hook_name``. Other clients and keys never see it."""
        if not isinstance(sae, UploadedSae):
            sae = self.upload_sae(sae, hook, ttl_s)
        if sae.hook in self.saes:
            raise ValueError(f"an SAE is attached at {sae.hook!r} already (reset_saes first)")
        self._attach([*self._attached, sae])
        return sae

    def reset_saes(self) -> None:
        """Detach every SAE ``add_sae`` attached (they stay uploaded: ``delete_sae``)."""
        self._attach([])

    def uploaded_saes(self) -> list[UploadedSae]:
        """Every SAE this key has uploaded (and not deleted; they expire like stored tensors)."""
        listed = self._transport.get_json("/v1/saes")["saes"]
        return [UploadedSae.from_server(info) for info in listed]

    def delete_sae(self, sae: UploadedSae | str) -> None:
        """Delete an uploaded SAE (detached first when attached)."""
        sae_id = sae if isinstance(sae, str) else sae.id
        self._attach([kept for kept in self._attached if kept.id != sae_id])
        self._transport.delete(f"/v1/saes/{sae_id}")

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Sequence[UploadedSae | str | Path] = (), **kwargs: Any
    ) -> tuple[Any, ActivationCache | MutableMapping[str, torch.Tensor]]:
        """``run_with_cache`` with ``saes`` attached for this call (SAELens's method)."""
        with self._saes_for_call(saes):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: Sequence[UploadedSae | str | Path] = (), **kwargs: Any
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached for this call (SAELens's method)."""
        with self._saes_for_call(saes):
            return self.run_with_hooks(*model_args, **kwargs)

    @contextmanager
    def _saes_for_call(self, saes: Sequence[UploadedSae | str | Path]) -> Iterator[None]:
        before = list(self._attached)
        try:
            for sae in saes:
                self.add_sae(sae)
            yield
        finally:
            self._attach(before)

    def _attach(self, saes: list[UploadedSae]) -> None:
        """Attach exactly ``saes``: the hook names (and which fire), the shapes Python hook
        functions are traced with and the HookPoints they get follow."""
        for sae in self._attached:
            for name in sae.points:
                for table in (self._fires, self._fires_by_default, self._functions.shapes):
                    table.pop(name, None)
                self.hook_dict.pop(name, None)
        self._attached = saes
        self.hook_names = with_points(self._model_hook_names, saes)
        served = self.info["cfg"].get("sae_widths") or {}
        widths = {**served, **{sae.hook: sae.d_sae for sae in saes}}
        self._functions.cfg = {**self.info["cfg"], "sae_widths": widths}
        hosts = {point["name"]: point["shape"] for point in self.info["hook_points"]}
        for sae in saes:
            for name in sae.points:  # they fire on every forward, as a served SAE's points
                self._fires[name] = self._fires_by_default[name] = True
                shape = list(hosts[sae.hook])
                if name.endswith(("hook_sae_acts_pre", "hook_sae_acts_post")):
                    shape[-1] = f"d_sae[{sae.hook}]"
                self._functions.shapes[name] = shape
                self.hook_dict[name] = HookPoint(self, name)

    # --- tokenizer ------------------------------------------------------------------------
    # Local: the server's tokenizer files are fetched once, then no helper makes a request.

    @property
    def tokenizer(self) -> Tokenizer | None:
        """A Hugging Face tokenizer built from the server's tokenizer files (None when the model
        has none, as in TransformerLens)."""
        if self._tokenizer is None and self.info.get("tokenizer") is not None:
            files = self._transport.get_json("/v1/tokenizer")["files"]
            self._tokenizer = tokenization.load_tokenizer(files, self.cfg.tokenizer_name)
        return self._tokenizer

    def _require_tokenizer(self) -> Tokenizer:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise tokenization.TokenizationError(
                "this model has no tokenizer; pass token ids instead of strings"
            )
        return tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Token ids [batch, pos] (TransformerLens's ``to_tokens``), computed locally."""
        tokens = tokenization.to_tokens(
            self._require_tokenizer(), self.cfg, input, prepend_bos, padding_side, truncate
        )
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_str_tokens(
        self,
        input: str | TokensLike | list[Any],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        return tokenization.to_str_tokens(
            self._require_tokenizer(), self.cfg, input, prepend_bos, padding_side
        )

    def to_string(self, tokens: TokensLike) -> str | list[str]:
        return tokenization.to_string(self._require_tokenizer(), tokens)

    def to_single_token(self, string: str) -> int:
        return tokenization.to_single_token(self._require_tokenizer(), self.cfg, string)

    def to_single_str_token(self, int_token: int) -> str:
        return str(self.to_str_tokens(torch.tensor([int_token]))[0])

    def get_token_position(
        self,
        single_token: str | int | torch.Tensor,
        input: str | torch.Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> int:
        return tokenization.get_token_position(
            self._require_tokenizer(), self.cfg, single_token, input, mode, prepend_bos,
            padding_side,
        )  # fmt: skip

    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` [batch, pos, vocab] on ``tokens``, computed
        here as TransformerLens's ``lm_cross_entropy_loss``: the mean, or [batch, pos - 1]
        with ``per_token``; masked positions (and those before them) do not count."""
        tokens = tokens.to(logits.device)
        log_probs = torch.log_softmax(logits, dim=-1)
        predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
        if attention_mask is None:
            count = predicted.numel()
        else:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    "attention_mask must have the same shape as tokens, "
                    f"got {tuple(attention_mask.shape)} and {tuple(tokens.shape)}"
                )
            pairs = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:])
            predicted = predicted.masked_fill(~pairs.to(predicted.device), 0.0)
            count = int(pairs.sum().item())
        return -predicted if per_token else -predicted.sum() / count

    # --- weights --------------------------------------------------------------------------

    def _fetch_weight(self, name: str) -> torch.Tensor:
        try:
            _, tensors = self._transport.frames("GET", f"/v1/weights/{name}", progress=False)
        except NotFoundError:
            raise KeyError(f"the model has no parameter {name!r}") from None
        return tensors[name]

    def parameter(self, name: str) -> torch.Tensor:
        """A weight by TransformerLens name (``W_Q``, ``blocks.0.attn.W_O``, ``unembed.W_U``),
        fetched once and shared by all its names (KeyError if the model has none)."""
        return self._weights.get(name)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """TransformerLens's parameter names and weights, each fetched as it is reached."""
        return self._root.named_parameters(prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return self._root.parameters(recurse)

    def state_dict(self) -> LazyStateDict:
        """The weights by TransformerLens name (no buffers); each is fetched when read."""
        return self._root.state_dict()

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def _optional(self, name: str) -> torch.Tensor | None:
        try:
            return self.parameter(name)
        except KeyError:
            return None

    W_E = property(lambda self: self.parameter("W_E"))
    W_pos = property(lambda self: self._optional("W_pos"))
    W_U = property(lambda self: self.parameter("W_U"))
    b_U = property(lambda self: self.parameter("b_U"))
    W_Q = property(lambda self: self.parameter("W_Q"))
    W_K = property(lambda self: self.parameter("W_K"))
    W_V = property(lambda self: self.parameter("W_V"))
    W_O = property(lambda self: self.parameter("W_O"))
    b_Q = property(lambda self: self.parameter("b_Q"))
    b_K = property(lambda self: self.parameter("b_K"))
    b_V = property(lambda self: self.parameter("b_V"))
    b_O = property(lambda self: self.parameter("b_O"))
    W_in = property(lambda self: self.parameter("W_in"))
    W_gate = property(lambda self: self._optional("W_gate"))
    W_out = property(lambda self: self.parameter("W_out"))
    b_in = property(lambda self: self.parameter("b_in"))
    b_out = property(lambda self: self.parameter("b_out"))

    @property
    def W_E_pos(self) -> torch.Tensor:
        return self.W_E if self.W_pos is None else torch.cat([self.W_E, self.W_pos], dim=0)

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        W_U: torch.Tensor = self.W_U
        return W_U[:, torch.as_tensor(tokens)].movedim(0, -1)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        total = torch.zeros(self.cfg.d_model, dtype=self.b_O.dtype)
        for index in range(layer):
            total = total + self.b_O[index] + (self.b_out[index] if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.b_O[layer]
        return total

    # --- stored objects -------------------------------------------------------------------

    def store_tensor(self, tensor: torch.Tensor, ttl_s: float | None = None) -> str:
        """Keep a tensor on the server (e.g. a steering vector); returns its id."""
        from ._transport import wire_tensor

        body = {"tensor": wire_tensor(tensor), "ttl_s": ttl_s}
        tensor_id: str = self._transport.post_json("/v1/tensors", body)["id"]
        return tensor_id

    def delete_stored(self, object_id: str) -> None:
        kind = "caches" if object_id.startswith("c_") else "tensors"
        self._transport.delete(f"/v1/{kind}/{object_id}")


def _once(make: Callable[[], ShapePlan]) -> Callable[[], ShapePlan]:
    """``make`` called on first need only, its result kept."""
    made: list[ShapePlan] = []

    def get() -> ShapePlan:
        if not made:
            made.append(make())
        return made[0]

    return get


def _output(outputs: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> Any:
    if kwargs.get("stop_at_layer") is not None:
        return outputs[OUTPUT_RESIDUAL]
    return_type = kwargs.get("return_type", "logits")
    if return_type == "logits":
        return outputs[OUTPUT_LOGITS]
    if return_type == "loss":
        return outputs[OUTPUT_LOSS]
    if return_type == "both":
        return Output(logits=outputs[OUTPUT_LOGITS], loss=outputs[OUTPUT_LOSS])
    return None
