"""Logits that stay on the server until something reads them.

``run_with_hooks`` (every hook traced) returns a :class:`LazyLogits`: a tensor with the logits'
shape and dtype whose forward has not run yet. Tensor operations on it are recorded (as a
traced hook's are), so a patching metric such as ``logits[:, -1, a] - logits[:, -1, b]`` grows
a graph; reading a value — ``.item()``, ``float()``, printing, an op outside the opset, or a
plain ``torch`` function — sends the forward with that graph and brings back only the value
read. TransformerLens's ``patching`` loop (``metric(model.run_with_hooks(...)).item()``) then
moves a number per patch instead of the full logits. Each value is fetched once.

``.backward()`` on a recorded scalar sends the forward with that graph as the objective of a
backward pass, which runs on the server with the call's backward hooks (TransformerLens's
``metric(model(tokens)).backward()``); the scalar's value comes back with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from .tracing import Untraceable, graph_for, record_call, start_recording

# The property; reading it reaches __torch_function__ as its __get__.
DEVICE_PROPERTY = torch.Tensor.device

# fetch(graph, backward): the value of ``graph`` (None: the logits); with ``backward``, the value
# of the scalar ``graph`` after a backward pass from it.
Fetch = Callable[[dict[str, Any] | None, bool], torch.Tensor]


class _Pending:
    """One deferred forward: its recording, and the values already fetched."""

    def __init__(self, fetch: Fetch, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.fetch = fetch  # sends the forward with a logits graph (None: the logits)
        self.stand_in = torch.empty(tuple(shape), dtype=dtype, device="meta")
        self.recording = start_recording(self.stand_in)
        self.values: dict[int, torch.Tensor] = {}  # id of a meta value -> its fetched value

    def value(self, meta: torch.Tensor) -> torch.Tensor:
        found = self.values.get(id(meta))
        if found is None:
            if meta is self.stand_in:
                found = self.fetch(None, False)
            else:
                found = self.fetch(graph_for(self.recording, meta), False)
            self.values[id(meta)] = found
        return found

    def backward(self, meta: torch.Tensor) -> None:
        if meta.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        value = self.fetch(graph_for(self.recording, meta), True)
        self.values[id(meta)] = value.reshape(meta.shape).to(meta.dtype)


class LazyLogits(torch.Tensor):
    """A tensor whose values are computed on the server when first read."""

    _pending: _Pending
    _meta: torch.Tensor

    @staticmethod
    def __new__(cls, pending: _Pending, meta: torch.Tensor) -> LazyLogits:
        made = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, dtype=meta.dtype, device=torch.device("cpu"), requires_grad=False
        )
        made._pending = pending
        made._meta = meta
        return made

    @classmethod
    def of(cls, fetch: Fetch, shape: Sequence[int], dtype: torch.dtype) -> LazyLogits:
        pending = _Pending(fetch, shape, dtype)
        return cls(pending, pending.stand_in)

    def materialize(self) -> torch.Tensor:
        return self._pending.value(self._meta)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return repr(self.materialize())

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return _backward(*args, **kwargs)
        if getattr(func, "__self__", None) is DEVICE_PROPERTY:  # where its values will be
            return torch.device("cpu")
        lazies = [value for value in _leaves((args, kwargs)) if isinstance(value, LazyLogits)]
        pending = lazies[0]._pending
        if all(lazy._pending is pending for lazy in lazies):
            try:
                with torch._C.DisableTorchFunctionSubclass():
                    result = record_call(pending.recording, func, *_to_meta((args, kwargs)))
            except Untraceable:
                pass
            else:
                return _wrap(pending, result)
        real_args, real_kwargs = _materialized((args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*real_args, **real_kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Reached only below the torch API (no recorder saw it): compute on real values.
        real_args, real_kwargs = _materialized((args, kwargs or {}))
        return func(*real_args, **real_kwargs)


def _backward(
    tensor: LazyLogits,
    gradient: Any = None,
    retain_graph: Any = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """``Tensor.backward`` of a lazy scalar: the forward and backward run on the server."""
    if gradient is not None or create_graph or inputs is not None:
        raise NotImplementedError(
            "a server-side backward starts from a scalar: call .backward() with no arguments"
        )
    tensor._pending.backward(tensor._meta)


def _leaves(tree: Any) -> list[Any]:
    found: list[Any] = []
    tree_map(lambda leaf: found.append(leaf), tree)
    return found


def _to_meta(tree: tuple[Sequence[Any], dict[str, Any]]) -> tuple[Sequence[Any], dict[str, Any]]:
    return tree_map(lambda leaf: leaf._meta if isinstance(leaf, LazyLogits) else leaf, tree)  # type: ignore[no-any-return]


def _materialized(
    tree: tuple[Sequence[Any], dict[str, Any]],
) -> tuple[Sequence[Any], dict[str, Any]]:
    return tree_map(  # type: ignore[no-any-return]
        lambda leaf: leaf.materialize() if isinstance(leaf, LazyLogits) else leaf, tree
    )


def _wrap(pending: _Pending, result: Any) -> Any:
    """Recorded results (meta tensors) become lazy tensors; shapes and numbers pass through."""
    return tree_map(
        lambda leaf: (
            LazyLogits(pending, leaf)
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta"
            else leaf
        ),
        result,
    )
