"""The one exception type operations raise for a request that cannot be served as asked."""

from __future__ import annotations

from hooklab_proto import ErrorCode


class RequestError(Exception):
    """Bad input detected before (or while) running; becomes a 4xx with a JSON error body."""

    def __init__(self, code: ErrorCode, message: str, hint: str | None = None, status: int = 422):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status
