"""Activations that came back in the sparse top-k form (``run_with_cache(sparse_top_k=k)``).

The server sends such a point as two tensors, ``{name}.top_k_indices`` and
``{name}.top_k_values`` ([..., k], torch.topk's order along the last axis); the cache holds
them as one :class:`TopK` under ``name``: ``.values`` and ``.indices`` as ``torch.topk``
returns them, and ``.to_dense()`` / ``.to_sparse()`` for the full [..., width] tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hooklab_proto import SAE_FEATURE_POINTS, TOP_K_INDICES_SUFFIX, TOP_K_VALUES_SUFFIX


@dataclass(frozen=True)
class TopK:
    """The k largest entries per position of an activation's last axis (e.g. an SAE's
    features): ``values`` [..., k] largest first, ``indices`` [..., k] (int64) where they sit
    in the last axis of ``width`` entries. Like ``torch.topk``'s result (``values, indices =
    cache[name]`` works); the entries not kept are read as 0 by ``to_dense``."""

    values: torch.Tensor
    indices: torch.Tensor
    width: int  # the dense last axis's size (d_sae for an SAE's features)

    def __iter__(self) -> Any:
        return iter((self.values, self.indices))  # torch.return_types.topk's unpacking

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The dense tensor's shape."""
        return torch.Size((*self.values.shape[:-1], self.width))

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def to_dense(self) -> torch.Tensor:
        """[..., width] with the kept values at their indices and 0 elsewhere (for a ReLU
        SAE's activations with k at least the active count: the dense activations)."""
        dense = self.values.new_zeros(self.shape)
        return dense.scatter_(-1, self.indices, self.values)

    def to_sparse(self) -> torch.Tensor:
        """A torch sparse COO tensor of the dense shape holding the kept entries."""
        rows = math.prod(self.values.shape[:-1])
        leading = torch.arange(rows, device=self.indices.device).repeat_interleave(self.k)
        position = torch.stack(torch.unravel_index(leading, tuple(self.values.shape[:-1])))
        coords = torch.cat([position, self.indices.reshape(1, -1)])
        values = self.values.reshape(-1)
        # Valid by construction (distinct indices per row, within the shape): no checks.
        sparse = torch.sparse_coo_tensor(coords, values, self.shape, check_invariants=False)
        return sparse.coalesce()

    def to(self, *args: Any, **kwargs: Any) -> TopK:
        """Both tensors moved (a dtype applies to the values only)."""
        values = self.values.to(*args, **kwargs)
        return TopK(values, self.indices.to(values.device), self.width)

    def __getitem__(self, index: Any) -> TopK:
        """Indexing the leading axes (batch, position, …), never the last."""
        return TopK(self.values[index], self.indices[index], self.width)


def top_k_of(value: torch.Tensor | TopK, k: int) -> TopK:
    """``value``'s k largest along its last axis (a TopK already here: its first k)."""
    if isinstance(value, TopK):
        if k > value.k:
            raise ValueError(f"this entry came with its top {value.k}; ask for at most that")
        return TopK(value.values[..., :k], value.indices[..., :k], value.width)
    values, indices = torch.topk(value, k, dim=-1)
    return TopK(values, indices, int(value.shape[-1]))


def gather_top_k(
    tensors: Mapping[str, torch.Tensor], widths: Mapping[str, int]
) -> dict[str, torch.Tensor | TopK]:
    """``tensors`` with each pair of top-k tensors joined into one :class:`TopK` under the
    hook name, in the order the names arrived."""
    entries: dict[str, torch.Tensor | TopK] = {}
    for name, value in tensors.items():
        if name.endswith(TOP_K_VALUES_SUFFIX):
            continue  # joined with its indices
        hook = name.removesuffix(TOP_K_INDICES_SUFFIX)
        if hook == name:
            entries[name] = value
            continue
        values = tensors[hook + TOP_K_VALUES_SUFFIX]
        entries[hook] = TopK(values, value.long(), widths[hook])
    return entries


def last_axis_sizes(
    hook_shapes: Mapping[str, Sequence[str | int]],
    sizes: Mapping[str, int],
    names: Sequence[str],
) -> dict[str, int]:
    """The size of each name's last axis, from its symbolic shape (``/v1/model``); an SAE
    feature point not listed there (an SAE attached per request) is ``d_sae[HOST]`` wide."""
    widths: dict[str, int] = {}
    for name in names:
        host, _, point = name.rpartition(".")
        sae_axis = f"d_sae[{host}]" if "." + point in SAE_FEATURE_POINTS else None
        axis = hook_shapes[name][-1] if name in hook_shapes else sae_axis
        if axis is None:
            raise KeyError(f"no shape known for {name!r}")
        widths[name] = axis if isinstance(axis, int) else sizes[axis]
    return widths


__all__ = ["TopK", "gather_top_k", "last_axis_sizes", "top_k_of"]
