"""TransformerLens 3.9's ``ActivationCache`` analysis and slicing semantics, one implementation
shared by hooklab's client (caches held there) and server (caches that stay there), so an
analysis gives the same numbers wherever it runs."""

from .activation_cache import ActivationCache
from .utils import Slice, as_slice, get_act_name

__all__ = ["ActivationCache", "Slice", "as_slice", "get_act_name"]
