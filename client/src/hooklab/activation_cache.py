"""``ActivationCache``: TransformerLens 3.9's cache and its analysis methods (the shared
implementation, ``hooklab_analysis.ActivationCache``), for caches held here or on the server.

A cache that stays on the server (``run_with_cache(..., lazy=True)``; see
``hooklab.remote_cache``) has every name, shape and dtype here and brings an activation when it
is read. Its analysis methods run where the data is: the server runs the same code on its copy
and sends only the result (``POST /v1/analysis``). Selecting batch rows and moving to a device
are recorded and applied to whatever arrives.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from hooklab_analysis import ActivationCache as _Cache

from hooklab_proto import ANALYSIS_METHODS, GRAD_SUFFIX

from .remote_cache import RemoteEntries, fetching_first
from .sparse import TopK, top_k_of
from .utils import Slice, SliceInput, as_slice


class ActivationCache(_Cache):
    __doc__ = _Cache.__doc__

    # Declared for type checkers only: HookedTransformer.run_with_cache sets it (the stored
    # cache's id with store=True or a lazy cache, else None); a cache built any other way has
    # no such attribute.
    cache_id: str | None

    @property
    def lazy(self) -> bool:
        """Whether the activations stay on the server until read (``hooklab.remote_cache``)."""
        return isinstance(self.cache_dict, RemoteEntries)

    def release(self) -> None:
        """Free the server's copy of a lazy cache now (what was read stays readable here);
        otherwise it goes when this cache is garbage-collected, or at the store's time to live.
        Nothing to do for a cache held here."""
        if isinstance(self.cache_dict, RemoteEntries):
            self.cache_dict.release()

    def top_k(self, name: str, k: int) -> TopK:
        """Entry ``name``'s k largest along its last axis (e.g. an SAE's features), as
        ``torch.topk`` orders them (hooklab's addition). A lazy cache sends only those
        (``GET /v1/caches/{id}?top_k=k``): a few percent of the dense bytes."""
        if isinstance(self.cache_dict, RemoteEntries):
            return self.cache_dict.top_k(name, k)
        return top_k_of(self.cache_dict[name], k)

    def gradients(self) -> ActivationCache:
        """The ``{name}_grad`` entries (``run_with_cache(..., incl_bwd=True)``) as a cache of
        their own, keyed by the hook names, so every analysis method works on gradients
        (hooklab's addition; in TransformerLens one builds it by hand from the backward hooks,
        as its attribution-patching demo does)."""
        names = [name for name in self.cache_dict if name.endswith(GRAD_SUFFIX)]
        if not names:
            raise KeyError("this cache holds no gradients: run_with_cache(..., incl_bwd=True)")
        if isinstance(self.cache_dict, RemoteEntries):
            self.cache_dict.fetch(names)
        grads = {name.removesuffix(GRAD_SUFFIX): self.cache_dict[name] for name in names}
        return ActivationCache(grads, self.model, self.has_batch_dim)

    # --- a lazy cache: views recorded, shapes without bytes ---------------------------------

    def _shape(self, name: str) -> torch.Size:
        shape_of = getattr(self.cache_dict, "shape_of", None)  # entries kept elsewhere
        return super()._shape(name) if shape_of is None else shape_of(name)

    def remove_batch_dim(self) -> ActivationCache:
        if isinstance(self.cache_dict, RemoteEntries) and self.has_batch_dim:
            batch_size = self._batch_size()
            if batch_size != 1:
                raise AssertionError(
                    f"Cannot remove batch dimension from cache with batch size {batch_size}"
                )
            self.cache_dict = self.cache_dict.rows(0)  # applied to what is fetched
            self.has_batch_dim = False
            return self
        super().remove_batch_dim()
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Slice | SliceInput) -> ActivationCache:
        if isinstance(self.cache_dict, RemoteEntries) and self.has_batch_dim:
            keeps_batch_dim = as_slice(batch_slice).mode != "int"
            rows = self.cache_dict.rows(batch_slice)  # applied to what is fetched
            return ActivationCache(rows, self.model, has_batch_dim=keeps_batch_dim)
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        assert isinstance(sliced, ActivationCache)
        return sliced

    def to(self, device: str | torch.device) -> ActivationCache:
        if isinstance(self.cache_dict, RemoteEntries):
            self.cache_dict.to(device)  # applied to what is fetched
            return self
        super().to(device)
        return self


def _where_the_data_is(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A lazy cache's analysis method: on the server when it can run there (nothing set here
    that the server lacks), else here, after one request for the entries it reads."""
    signature = inspect.signature(method)
    here = fetching_first(method)

    @functools.wraps(method)
    def run(cache: ActivationCache, *args: Any, **kwargs: Any) -> Any:
        entries = cache.cache_dict
        if isinstance(entries, RemoteEntries) and entries.on_server_only():
            bound = signature.bind(cache, *args, **kwargs)
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            return entries.analyse(name, arguments)
        return here(cache, *args, **kwargs)

    return run


for _name in ANALYSIS_METHODS:
    setattr(ActivationCache, _name, _where_the_data_is(getattr(_Cache, _name), _name))
# compute_head_results adds entries: it runs here (reading hook_z once per layer).
ActivationCache.compute_head_results = fetching_first(_Cache.compute_head_results)  # type: ignore[method-assign]

__all__ = ["ActivationCache"]
