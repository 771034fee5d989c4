"""hooklab — TransformerLens's ``HookedTransformer`` API against a remote hooklab server.

from hooklab import HookedTransformer, hooks
model = HookedTransformer.from_server("http://gpu-box:8000")
logits, cache = model.run_with_cache("The Eiffel Tower is in")
model.run_with_hooks(tokens, fwd_hooks=[("blocks.5.hook_resid_post", hooks.ablate())])
"""

from hooklab_proto import WireFormatError

from . import errors, hooks, metrics, patching, utils
from .activation_cache import ActivationCache
from .factored_matrix import FactoredMatrix
from .model import HookedTransformer
from .uploaded_saes import UploadedSae

__version__ = "0.1.0"


def connect(
    url: str, api_key: str | None = None, timeout: float | None = 60.0, model: str | None = None
) -> HookedTransformer:
    """Shorthand for :meth:`HookedTransformer.from_server`."""
    return HookedTransformer.from_server(url, api_key, timeout, model)


__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "HookedTransformer",
    "UploadedSae",
    "WireFormatError",
    "__version__",
    "connect",
    "errors",
    "hooks",
    "metrics",
    "patching",
    "utils",
]
