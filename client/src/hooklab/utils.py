"""TransformerLens 3.9's small utilities: hook-name shorthand (``get_act_name``), ``Slice`` and
friends — the shared implementation (``hooklab_analysis.utils``), which the server uses too."""

from hooklab_analysis.utils import (
    Slice,
    SliceInput,
    SliceMode,
    as_slice,
    get_act_name,
    get_corner,
    transpose,
)

__all__ = [
    "Slice",
    "SliceInput",
    "SliceMode",
    "as_slice",
    "get_act_name",
    "get_corner",
    "transpose",
]
