"""Handing freed memory back to the system after big work.

glibc keeps freed heap memory for reuse — hundreds of MiB after one large forward — so a
server that ran one big request would keep looking that big. ``malloc_trim`` returns it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# Work estimated to peak above this hands its freed memory back when it ends.
TRIM_ABOVE_BYTES = 64 * 2**20


def _malloc_trim() -> Callable[[], None]:
    """``malloc_trim(0)``, or a no-op where the C library has none."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


release_memory = _malloc_trim()
