"""Operations on the engine, independent of HTTP: validate a request, run it, return tensors."""

from .errors import RequestError
from .run import Runner, RunResult

__all__ = ["RequestError", "RunResult", "Runner"]
