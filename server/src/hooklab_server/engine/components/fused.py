"""One matmul for projections that read the same input: q/k/v, gate/up.

The unfused parameters (``w_q``, ``w_k``, ``w_v``; ``w_gate``, ``w_in``) stay what the weights
API, ``state_dict`` and the hooks' views are about. Loading lays each group out as consecutive
rows of one buffer (:func:`share_rows`), so the fused weight is a view of that buffer, not a copy.
When the parameters are not laid out so (replaced, moved to another device one by one), the
fused weight is a concatenation, made again whenever a part's storage or version changes.

The fused product is always the one used (one input, one matmul; hooks see the split views),
never switched off by a hook or a capture, so what a call captures or reads cannot change its
numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _adjacent(parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``parts`` (2-D, same width) are consecutive rows of one contiguous buffer."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for part in parts:
        if (
            not part.is_contiguous()
            or part.dim() != 2
            or part.shape[1] != first.shape[1]
            or part.untyped_storage().data_ptr() != storage
            or part.storage_offset() != offset
        ):
            return False
        offset += part.numel()
    return True


def _rows_view(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Adjacent ``parts`` as one [sum(out_i), in] view of their buffer."""
    first = parts[0]
    rows = sum(part.shape[0] for part in parts)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


class RowConcat:
    """The rows of several [out_i, in] weights as one [sum(out_i), in] weight."""

    __slots__ = ("_key", "_traced_view", "_value")

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int, int], ...] | None = None
        self._value: torch.Tensor | None = None
        # Under torch.compile (engine/compiled.py) storage pointers cannot be traced: whether
        # the parts are one buffer is decided once, by ``prepare_trace``, and trusted.
        self._traced_view = False

    def prepare_trace(self, parts: Sequence[torch.Tensor]) -> None:
        """Decide, before a compile, whether the traced path may view ``parts`` as one weight."""
        self._traced_view = _adjacent(parts)

    def __call__(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return (
                _rows_view(parts) if self._traced_view else torch.cat([p.detach() for p in parts])
            )
        if _adjacent(parts):
            return _rows_view(parts)
        key = tuple((p.data_ptr(), _version(p), p.shape[0]) for p in parts)
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = torch.cat([p.detach() for p in parts])
            self._key = key
        return self._value


def fused_bias(
    cache: RowConcat, biases: Sequence[torch.Tensor | None], sizes: Sequence[int]
) -> torch.Tensor | None:
    """The fused bias (zeros where a part has none), or None when no part has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    if len(present) == len(biases):
        return cache([b.view(-1, 1) for b in present]).view(-1)
    if torch.compiler.is_compiling():  # no storage pointers in a trace; biases are small
        return torch.cat(
            [
                b if b is not None else present[0].new_zeros(n)
                for b, n in zip(biases, sizes, strict=True)
            ]
        )
    key = tuple(
        (b.data_ptr(), _version(b), n) if b is not None else (0, 0, n)
        for b, n in zip(biases, sizes, strict=True)
    )
    if cache._value is None or key != cache._key:
        like = present[0]
        parts = [
            b.detach() if b is not None else like.new_zeros(n)
            for b, n in zip(biases, sizes, strict=True)
        ]
        cache._value, cache._key = torch.cat(parts), key
    return cache._value


def share_rows(module: nn.Module, names: Sequence[str]) -> None:
    """Lay the parameters ``names`` of ``module`` out as consecutive rows of one buffer (same
    values), so that :class:`RowConcat` views it instead of copying. Skips a missing one."""
    params = [getattr(module, name) for name in names]
    if any(p is None for p in params) or not params:
        return
    if len({(p.dtype, p.device, p.dim(), *p.shape[1:]) for p in params}) != 1:
        return
    with torch.no_grad():
        buffer = torch.cat([p.detach().reshape(p.shape[0], -1) for p in params])
    start = 0
    for name, param in zip(names, params, strict=True):
        rows = param.shape[0]
        view = buffer[start : start + rows].view_as(param)
        setattr(module, name, nn.Parameter(view, requires_grad=param.requires_grad))
        start += rows
