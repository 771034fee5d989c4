"""The entries of an ActivationCache that stays on the server, read when indexed.

``run_with_cache`` of a large cache keeps it on the server (a stored cache, under the caller's
key, with the store's time to live) and answers only its index: each entry's name, shape and
dtype. :class:`RemoteEntries` is then the cache's ``cache_dict``: names, ``len``, ``in`` and
shapes need no bytes; indexing an entry fetches it (``GET /v1/caches/{id}?names=…``) and keeps
it; :meth:`RemoteEntries.fetch` brings several in one request, which the cache's analysis
methods do for the entries they read. Selecting batch rows (``remove_batch_dim``,
``apply_slice_to_batch_dim``) and moving to a device are recorded and applied to what arrives.

The server copy is released by ``ActivationCache.release()``, or when the last cache using it
is garbage-collected; a read after it is gone (released, or past the time to live) raises
:class:`CacheGoneError`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch.utils._pytree import tree_map

from hooklab_proto import (
    ANALYSIS_RESULT,
    TOP_K_INDICES_SUFFIX,
    TOP_K_VALUES_SUFFIX,
    torch_dtype,
)

from ._transport import Transport
from .errors import NotFoundError, ServerError
from .lazy import DEVICE_PROPERTY
from .sparse import TopK, top_k_of
from .utils import Slice, SliceInput, as_slice

OUTPUT_PREFIX = "output."  # the wire's names of a forward's outputs


class CacheGoneError(NotFoundError):
    """The server no longer holds a lazy cache's activations (released, or expired)."""


class _ServerCopy:
    """The stored cache, shared by every lazy cache reading it (views included): released
    once, explicitly or when the last of them is garbage-collected."""

    def __init__(
        self,
        transport: Transport,
        cache_id: str,
        ttl_s: float | None,
        keep: bool = False,
        wire_dtype: str | None = None,
    ) -> None:
        self.transport, self.cache_id, self.ttl_s = transport, cache_id, ttl_s
        self.wire_dtype = wire_dtype  # what the entries travel as (None: as stored)
        self.released = False
        self._lock = threading.Lock()
        # Runs when this object is collected (unless the caller keeps the cache: store=True);
        # a request inside the collector's frame could block it, so it goes to a thread.
        self._on_collect = weakref.finalize(self, _delete_in_background, transport, cache_id)
        if keep:
            self._on_collect.detach()

    def fetch(self, names: Sequence[str], top_k: int | None = None) -> dict[str, torch.Tensor]:
        if self.released:
            raise self._gone("it was released (cache.release())")
        path = f"/v1/caches/{self.cache_id}"
        try:
            query: dict[str, Any] = {"names": list(names)}
            if self.wire_dtype is not None:
                query["wire_dtype"] = self.wire_dtype
            if top_k is not None:  # each entry as its indices and values
                query["top_k"] = str(top_k)
            _, tensors = self.transport.frames("GET", path, query=query)
        except NotFoundError as exc:
            if "has no entry" in str(exc):
                raise
            raise self._gone(
                f"stored caches are kept {self.ttl_s:g} s (server setting store_ttl_s)"
                if self.ttl_s
                else "stored caches expire (server setting store_ttl_s)"
            ) from exc
        return tensors

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self._on_collect.detach()
        _delete(self.transport, self.cache_id)

    def _gone(self, why: str) -> CacheGoneError:
        return CacheGoneError(
            "not_found",
            f"the server no longer holds cache {self.cache_id!r}: {why}",
            "run run_with_cache again, or pass lazy=False to bring a cache here at once",
            404,
        )


def _delete(transport: Transport, cache_id: str) -> None:
    with contextlib.suppress(Exception):  # best effort: the time to live frees it anyway
        transport.delete(f"/v1/caches/{cache_id}")


def _delete_in_background(transport: Transport, cache_id: str) -> None:
    threading.Thread(
        target=_delete, args=(transport, cache_id), name="hooklab-release", daemon=True
    ).start()


class RemoteEntries(MutableMapping[str, torch.Tensor]):
    """A lazy cache's entries: name -> tensor, fetched on first read."""

    def __init__(
        self,
        copy: _ServerCopy,
        entries: dict[str, tuple[tuple[int, ...], torch.dtype]],
        rows: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        self._copy = copy
        self._entries = entries  # as stored: with the batch axis
        self._rows = rows  # the batch rows kept: 1-D, or 0-d (the batch axis dropped)
        self._device = device
        self._fetched: dict[str, torch.Tensor] = {}  # after rows and device
        self._local: dict[str, torch.Tensor] = {}  # entries set here (compute_head_results)
        self._removed: set[str] = set()

    @classmethod
    def on_server(
        cls,
        transport: Transport,
        cache_id: str,
        entries: dict[str, Any],
        ttl_s: float | None,
        keep: bool = False,
        wire_dtype: str | None = None,
    ) -> tuple[RemoteEntries, dict[str, RemoteTensor]]:
        """The activations of the stored cache ``cache_id``, and the outputs kept with them
        (``output.logits`` …: tensors read on use, not entries of the cache). Released when the
        last of them is collected, unless ``keep``."""
        copy = _ServerCopy(transport, cache_id, ttl_s, keep, wire_dtype)
        index = {
            name: (tuple(entry["shape"]), torch_dtype(entry["dtype"]))
            for name, entry in entries.items()
        }
        outputs = {n: entry for n, entry in index.items() if n.startswith(OUTPUT_PREFIX)}
        activations = {n: entry for n, entry in index.items() if n not in outputs}
        kept = cls(copy, outputs)
        return cls(copy, activations), {name: RemoteTensor(kept, name) for name in outputs}

    # --- the mapping ------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._local:
            return self._local[name]
        if name not in self:
            raise KeyError(name)
        if name not in self._fetched:
            self.fetch([name])
        return self._fetched[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._local[name] = value
        self._removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._local.pop(name, None)
        self._fetched.pop(name, None)
        self._removed.add(name)

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self._entries if name not in self._removed)
        yield from (name for name in self._local if name not in self._entries)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        in_server = name in self._entries and name not in self._removed
        return in_server or name in self._local

    # --- without bytes ----------------------------------------------------------------------

    def shape_of(self, name: str) -> torch.Size:
        if name in self._local or name in self._fetched:
            return self[name].shape
        shape = self._entries[name][0]
        if self._rows is None:
            return torch.Size(shape)
        return torch.Size((*self._rows.shape, *shape[1:]))

    def dtype_of(self, name: str) -> torch.dtype:
        return self._entries[name][1] if name in self._entries else self[name].dtype

    def fetched_names(self) -> list[str]:
        return list(self._fetched)

    # --- reading ----------------------------------------------------------------------------

    def fetch(self, names: Sequence[str]) -> None:
        """Bring the entries ``names`` not here yet, in one request."""
        wanted = [n for n in dict.fromkeys(names) if n in self._entries and n not in self._fetched]
        wanted = [n for n in wanted if n not in self._local and n not in self._removed]
        if not wanted:
            return
        for name, value in self._copy.fetch(wanted).items():
            value = value.to(self._entries[name][1])  # as stored (the wire may round it)
            if self._rows is not None:
                value = value[self._rows]
            if self._device is not None:
                value = value.to(self._device)
            self._fetched[name] = value

    def top_k(self, name: str, k: int) -> TopK:
        """Entry ``name``'s top k along its last axis: only those travel, unless the entry is
        here already (then taken here)."""
        if name in self._local or name in self._fetched or name not in self._entries:
            return top_k_of(self[name], k)
        tensors = self._copy.fetch([name], top_k=k)
        values = tensors[name + TOP_K_VALUES_SUFFIX].to(self._entries[name][1])
        indices = tensors[name + TOP_K_INDICES_SUFFIX].long()
        if self._rows is not None:
            values, indices = values[self._rows], indices[self._rows]
        if self._device is not None:
            values, indices = values.to(self._device), indices.to(self._device)
        return TopK(values, indices, self._entries[name][0][-1])

    def release(self) -> None:
        self._copy.release()

    # --- analysis on the server ------------------------------------------------------------

    def on_server_only(self) -> bool:
        """Nothing was set or removed here: the server's copy is this cache."""
        return not self._local and not self._removed

    def analyse(self, method: str, arguments: dict[str, Any]) -> Any:
        """``ActivationCache.method(**arguments)`` run by the server on its copy (read through
        this cache's batch rows); only the result travels."""
        body: dict[str, Any] = {
            "cache": self._copy.cache_id,
            "method": method,
            "args": {name: _wire_argument(value) for name, value in arguments.items()},
        }
        if self._rows is not None:
            body["rows"] = self._rows.tolist()
        try:
            meta, tensors = self._copy.transport.frames("POST", "/v1/analysis", body)
        except ServerError as exc:
            raise _as_python_error(exc) from None
        result = tensors[ANALYSIS_RESULT]
        if self._device is not None:
            result = result.to(self._device)
        labels = meta.get("labels")
        return result if labels is None else (result, list(labels))

    # --- views ------------------------------------------------------------------------------

    def rows(self, batch_slice: Slice | SliceInput) -> RemoteEntries:
        """The entries of the batch rows ``batch_slice`` selects (an int drops the axis)."""
        size = next(iter(self._entries.values()))[0][0] if self._entries else 0
        current = self._rows if self._rows is not None else torch.arange(size)
        picked = as_slice(batch_slice).apply(current, dim=0)
        view = RemoteEntries(self._copy, self._entries, picked, self._device)
        view._fetched = {
            name: as_slice(batch_slice).apply(v, 0) for name, v in self._fetched.items()
        }
        view._local = {name: as_slice(batch_slice).apply(v, 0) for name, v in self._local.items()}
        view._removed = set(self._removed)
        return view

    def to(self, device: str | torch.device) -> None:
        self._device = torch.device(device)
        self._fetched = {name: value.to(device) for name, value in self._fetched.items()}
        self._local = {name: value.to(device) for name, value in self._local.items()}


def _wire_argument(value: Any) -> Any:
    """An analysis argument as the wire carries it: a TransformerLens tuple slice (``(k,)``
    is ``:k``) or a ``Slice`` as ``{"start", "stop", "step"}`` — a list stays a list of
    indices; tensors, numbers and strings as they are."""
    if isinstance(value, Slice):
        value = value.slice
    if isinstance(value, slice):
        return {"start": value.start, "stop": value.stop, "step": value.step}
    if isinstance(value, tuple):
        return _wire_argument(slice(*value))
    return value


# What the shared analysis code raises, re-raised here as itself (TransformerLens's types).
_PYTHON_ERRORS: dict[str, type[Exception]] = {
    error.__name__: error
    for error in (KeyError, AssertionError, ValueError, IndexError, TypeError, RuntimeError)
}


def _as_python_error(exc: ServerError) -> Exception:
    kind, _, message = str(exc.message).partition(": ")
    error = _PYTHON_ERRORS.get(kind) if exc.code == "validation_error" else None
    return error(message) if error is not None else exc


class _Recorder(MutableMapping[str, torch.Tensor]):
    """Stands in for a lazy cache's entries during a dry run of an analysis method: records
    what it reads and gives zeros of the right shape (no memory: an expanded scalar)."""

    def __init__(self, entries: RemoteEntries) -> None:
        self.entries = entries
        self.read: list[str] = []
        self._local: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._local:
            return self._local[name]
        if name not in self.entries:
            raise KeyError(name)
        self.read.append(name)
        dtype = self.entries.dtype_of(name)
        return torch.zeros((), dtype=dtype).expand(self.entries.shape_of(name))

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._local[name] = value

    def __delitem__(self, name: str) -> None:
        self._local.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        yield from self.entries
        yield from (name for name in self._local if name not in self.entries)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name in self._local or name in self.entries

    def shape_of(self, name: str) -> torch.Size:
        return self._local[name].shape if name in self._local else self.entries.shape_of(name)


_dry = threading.local()


Method = TypeVar("Method", bound=Callable[..., Any])


def fetching_first(method: Method) -> Method:
    """For an ActivationCache analysis method: on a lazy cache, a dry run on zeros first finds
    the entries it reads, and one request brings them all before the real run."""

    @functools.wraps(method)
    def run(cache: Any, *args: Any, **kwargs: Any) -> Any:
        entries = cache.cache_dict
        if isinstance(entries, RemoteEntries) and not getattr(_dry, "active", False):
            recorder = _Recorder(entries)
            stand_in = copy.copy(cache)
            stand_in.cache_dict = recorder
            _dry.active = True
            try:  # a dry run that fails leaves the real run to read one entry at a time
                with contextlib.suppress(Exception):
                    method(stand_in, *args, **kwargs)
            finally:
                _dry.active = False
            entries.fetch(recorder.read)
            _dry.active = True  # the method's own nested analysis calls need no dry run
            try:
                return method(cache, *args, **kwargs)
            finally:
                _dry.active = False
        return method(cache, *args, **kwargs)

    return cast(Method, run)


class RemoteTensor(torch.Tensor):
    """An output kept with a lazy cache (the logits of ``run_with_cache``): its shape and dtype
    are here; any use brings its values (once)."""

    _entries: RemoteEntries
    _name: str

    @staticmethod
    def __new__(cls, entries: RemoteEntries, name: str) -> RemoteTensor:
        made = torch.Tensor._make_wrapper_subclass(
            cls, entries.shape_of(name), dtype=entries.dtype_of(name), device=torch.device("cpu")
        )
        made._entries, made._name = entries, name
        return made

    def materialize(self) -> torch.Tensor:
        return self._entries[self._name]

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return repr(self.materialize())

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if getattr(func, "__self__", None) is DEVICE_PROPERTY:
            return torch.device("cpu")
        real = _real((args, kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*real[0], **real[1])

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        real = _real((args, kwargs or {}))
        return func(*real[0], **real[1])


def _real(tree: Any) -> Any:

    return tree_map(
        lambda leaf: leaf.materialize() if isinstance(leaf, RemoteTensor) else leaf, tree
    )
