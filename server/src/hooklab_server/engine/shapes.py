"""Symbolic shapes of the hook points, for validating specs and describing the model.

Derived from the one declaration of the hook points in :mod:`.catalogue`.
"""

from .catalogue import Shape, axis_sizes, fires_by_default, hook_shape

__all__ = ["Shape", "axis_sizes", "fires_by_default", "hook_shape"]
