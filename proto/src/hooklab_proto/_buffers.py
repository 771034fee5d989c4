"""Byte buffers whose start is 64-byte aligned, so tensors viewing them are aligned too."""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64

# Anything exposing the buffer protocol that frames are read from.
Buffer = bytes | bytearray | memoryview


def aligned_buffer(size: int) -> memoryview:
    """A writable, *uninitialised* memoryview of ``size`` bytes on a 64-byte boundary.

    numpy's allocator is used on purpose: it asks the kernel for transparent huge pages on large
    blocks, which makes first-touch page faults — the dominant cost of receiving a large frame
    into fresh memory — several times cheaper than with ``bytearray``.
    """
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].data  # the same memoryview as memoryview(array)


def tensor_bytes(buffer: memoryview) -> memoryview:
    """``buffer`` as a flat, writable byte view; read-only input is copied once (aligned)."""
    flat = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
    if not flat.readonly:
        return flat
    copy = aligned_buffer(flat.nbytes)
    copy[:] = flat
    return copy
