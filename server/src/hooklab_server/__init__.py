"""hooklab_server — a hooked transformer resident on one device, served over HTTP."""

__version__ = "0.1.0"
