"""hooklab — TransformerLens's ``HookedTransformer`` API against a remote hooklab server.

The remote model, activation cache and hook-spec builders arrive with the HTTP API; today the
package re-exports the wire format it will speak.
"""

from hooklab_proto import WireFormatError

__version__ = "0.1.0"

__all__ = ["WireFormatError", "__version__"]
