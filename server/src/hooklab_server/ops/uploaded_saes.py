"""Sparse autoencoders a key uploads (``POST /v1/saes``) and attaches to its own requests.

An upload is checked in the order that keeps a hostile one cheap: the config's size, the config,
the hook point it reads and the bytes its shapes allow — all before the safetensors bytes are
parsed (safetensors only: nothing is unpickled). The weights are kept in the store as an object
of kind ``"sae"`` owned by the key, so they count in its stored bytes, expire like its tensors,
and are 404 to other keys; in a Redis deployment the workers read them from there.

A request naming SAEs (``saes: [id, …]``) is validated and run on a *view* of the model: a
shallow copy sharing every module and weight, whose config, hook names and SAEs have the
request's SAEs added. The served model and every other request never see them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from hooklab_proto import ErrorCode, SaeUploadRequest
from hooklab_server.engine import HookedTransformer
from hooklab_server.engine.catalogue import axis_sizes, hook_names, hook_shape
from hooklab_server.engine.hook_points import hook_name_advice
from hooklab_server.engine.saes import (
    MAX_CONFIG_BYTES,
    SaeConfig,
    SaeLoadError,
    SparseAutoencoder,
    parse_config,
    sae_from_tensors,
)
from hooklab_server.engine.shell import ModelShell

from ..auth import Account
from ..settings import Settings
from ..store import Store, StoredInfo, not_found
from .context import OpsContext
from .errors import RequestError, too_large

KIND = "sae"
# The safetensors header and tensors beyond the four SAELens writes (a threshold, a gated
# SAE's extra vectors) are small: this much over the float32 weights is allowed.
HEADER_SLACK_BYTES = 1 << 20
_STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weights_bound(cfg: SaeConfig) -> int:
    """The most bytes a config's weights may take: W_enc and W_dec, a few d_sae and d_in vectors,
    as float32."""
    return 4 * (2 * cfg.d_in * cfg.d_sae + 4 * cfg.d_sae + 2 * cfg.d_in)


def body_limit(settings: Settings) -> int:
    """The largest upload body: the weights as base64 text (JSON) and the config."""
    return settings.max_sae_bytes * 4 // 3 + 4 * MAX_CONFIG_BYTES + 4096


def _config(request: SaeUploadRequest) -> tuple[str, SaeConfig]:
    text = request.cfg if isinstance(request.cfg, str) else json.dumps(request.cfg)
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise too_large("bytes of SAE config", len(text.encode()), MAX_CONFIG_BYTES, "SAE cfg.json")
    try:
        return text, parse_config(text)
    except SaeLoadError as exc:
        raise RequestError(ErrorCode.VALIDATION, str(exc), "send SAELens's cfg.json") from None


def check_fits(model: HookedTransformer, hook: str, d_in: int) -> None:
    """An SAE reading ``hook`` with width ``d_in`` fits this model: the hook is a model point
    (not an SAE's) whose activation is [batch, pos, d_in]."""
    base = [name for name in model.hook_names if ".hook_sae_" not in name]
    if hook not in base:
        advice = hook_name_advice(hook, base)
        raise RequestError(
            ErrorCode.UNKNOWN_HOOK,
            f"no hook point {hook[:200]!r} in this model for an SAE to read",
            advice or "GET /v1/model lists the hook points",
        )
    shape = hook_shape(hook, model.cfg)
    width = axis_sizes(model.cfg, 1, 1).get(shape[-1])
    if len(shape) != 3 or shape[:2] != ("batch", "pos") or width != d_in:
        raise RequestError(
            ErrorCode.BAD_SHAPE,
            f"an SAE with d_in {d_in} does not fit {hook!r}: its activation is {list(shape)}"
            + (f" with {shape[-1]} = {width}" if width is not None else ""),
            "an SAE reads a [batch, pos, d] point whose d is its d_in",
        )


def upload(
    store: Store, model: HookedTransformer, settings: Settings, caller: Account,
    request: SaeUploadRequest,
) -> StoredInfo:  # fmt: skip
    """Check an upload (config, hook, sizes, then the safetensors) and store it for ``caller``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    text, cfg = _config(request)
    hook = request.hook or cfg.hook_name
    if not hook:
        raise RequestError(
            ErrorCode.VALIDATION,
            "the SAE config names no hook_name",
            "say which hook point it reads: 'hook' in the upload",
        )
    check_fits(model, hook, cfg.d_in)
    bound = weights_bound(cfg)
    if bound > settings.max_sae_bytes:
        raise too_large(
            f"bytes of SAE weights (d_in {cfg.d_in} x d_sae {cfg.d_sae} as float32)",
            bound, settings.max_sae_bytes, "max_sae_bytes",
        )  # fmt: skip
    if len(request.weights) > bound + HEADER_SLACK_BYTES:
        raise too_large(
            f"bytes of weights for an SAE whose config allows {bound} (d_in {cfg.d_in}, d_sae "
            f"{cfg.d_sae}, float32 at most)",
            len(request.weights), bound + HEADER_SLACK_BYTES, "the SAE's cfg.json",
        )  # fmt: skip
    try:
        tensors = load(request.weights)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise RequestError(
            ErrorCode.VALIDATION,
            f"the SAE weights are not safetensors: {str(exc)[:200]}",
            "send the bytes of sae_weights.safetensors (SAELens's save_model writes it)",
        ) from None
    given = tensors.get("W_enc")
    dtype = given.dtype if given is not None and given.dtype in _STORED_DTYPES else torch.float32
    try:
        sae = sae_from_tensors(cfg, tensors, dtype, "cpu")
    except SaeLoadError as exc:
        raise RequestError(
            ErrorCode.BAD_SHAPE, str(exc), "send the weights cfg.json describes"
        ) from None
    # Kept as uploaded (the SAE's tensors only): each use builds the SAE from them and the
    # config again, so whatever the config folds in (norm_scaling_factor) is folded once.
    kept = {name: tensors[name].to(dtype).contiguous() for name in weights(sae)}
    for name, tensor in kept.items():
        if not bool(tensor.float().isfinite().all()):
            raise RequestError(ErrorCode.BAD_VALUE, f"SAE weight {name!r} holds NaN or inf")
    details: dict[str, str | int] = {
        "hook": hook, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "architecture": cfg.architecture,
        "cfg": text,
    }  # fmt: skip
    return store.put(KIND, kept, caller, request.ttl_s, details)


def weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """An SAE's tensors by their SAELens names."""
    found = {f.name: getattr(sae, f.name) for f in dataclasses.fields(sae)}
    return {name: value for name, value in found.items() if isinstance(value, torch.Tensor)}


def listing(store: Store, caller: Account) -> list[StoredInfo]:
    return store.listing(KIND, caller)


def delete(store: Store, caller: Account, sae_id: str) -> None:
    store.delete(KIND, sae_id, caller)
    _LOADED.forget(sae_id)


class _Loaded:
    """SAEs made ready on a device, by id: each request re-checks that its key may use the id
    (the store's listing), then reuses the weights converted the first time. The least
    recently used go once they hold more than ``capacity_bytes`` (the last one always stays)."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        self.capacity_bytes = capacity_bytes
        self._saes: OrderedDict[tuple[str, str, torch.dtype], SparseAutoencoder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ctx: OpsContext, info: StoredInfo, cfg: SaeConfig) -> SparseAutoencoder:
        model = ctx.model
        key = (info.id, str(model.device), model.cfg.dtype)
        with self._lock:
            found = self._saes.get(key)
            if found is not None:
                self._saes.move_to_end(key)
                return found
        stored = ctx.store.get(KIND, info.id, ctx.caller).value
        assert isinstance(stored, dict)
        sae = sae_from_tensors(cfg, stored, model.cfg.dtype, model.device)
        with self._lock:
            self._saes[key] = sae
            while len(self._saes) > 1 and self._held() > self.capacity_bytes:
                self._saes.popitem(last=False)
        return sae

    def _held(self) -> int:
        return sum(sae.nbytes for sae in self._saes.values())

    def forget(self, sae_id: str) -> None:
        with self._lock:
            for key in [key for key in self._saes if key[0] == sae_id]:
                del self._saes[key]


_LOADED = _Loaded()


def with_saes(ctx: OpsContext, ids: Sequence[str]) -> OpsContext:
    """``ctx`` whose model is a view with the uploaded SAEs ``ids`` attached (``ctx`` itself
    when none are named). 404 for an id the caller may not use, as for stored objects."""
    if not ids:
        return ctx
    if len(set(ids)) != len(ids):
        raise RequestError(ErrorCode.VALIDATION, "saes names an SAE twice")
    model = ctx.model
    mine = {info.id: info for info in ctx.store.listing(KIND, ctx.caller)}
    widths: dict[str, int] = {}
    saes: dict[str, SparseAutoencoder] = {}
    for sae_id in ids:
        info = mine.get(sae_id)
        if info is None or info.details is None:
            raise not_found(KIND, sae_id)
        hook, cfg = str(info.details["hook"]), parse_config(str(info.details["cfg"]))
        if hook in model.cfg.sae_widths or hook in widths:
            raise RequestError(
                ErrorCode.CONFLICT,
                f"SAE {sae_id!r} reads {hook!r}, where another SAE is attached already",
                "attach one SAE per hook point in a request",
            )
        check_fits(model, hook, cfg.d_in)
        widths[hook] = cfg.d_sae
        if not isinstance(model, ModelShell):  # a shell validates only: the workers run it
            saes[hook] = _LOADED.get(ctx, info, cfg)
    return dataclasses.replace(ctx, model=model_view(model, widths, saes))


def model_view(
    model: HookedTransformer, widths: dict[str, int], saes: dict[str, SparseAutoencoder]
) -> HookedTransformer:
    """The model with more SAEs attached, for one request: a shallow copy (modules, weights and
    tokenizer shared), with its own config copy, hook names and SAEs."""
    view = copy.copy(model)
    cfg = copy.copy(model.cfg)  # not replace(): __post_init__ would recompute derived fields
    cfg.sae_widths = {**model.cfg.sae_widths, **widths}
    view.cfg = cfg
    view.hook_names = hook_names(cfg)
    view.saes = {**model.saes, **saes}
    return view


def context_of(ctx: OpsContext, work: object) -> OpsContext:
    """The context a work runs in: on its model view when it attached uploaded SAEs."""
    view = getattr(work, "model", None)
    return ctx if view is None else dataclasses.replace(ctx, model=view)
