"""The exceptions operations raise: a request that cannot be served as asked, and work stopped
because nobody waits for it any more. Neither knows about HTTP: the API maps codes to statuses."""

from __future__ import annotations

from hooklab_proto import ErrorCode


class RequestError(Exception):
    """Bad input detected before (or while) running, with a machine-readable code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.retry_after = retry_after  # seconds after which the same request may succeed


def too_large(
    what: str, count: int, limit: int, setting: str, hint: str | None = None
) -> RequestError:
    """The one wording of every size refusal: what, how many, the limit and its setting."""
    return RequestError(
        ErrorCode.TOO_LARGE,
        f"{count} {what} exceed the limit of {limit} (server setting {setting})",
        hint,
    )


class QuotaExceeded(RequestError):
    """Over one of the caller's quotas. ``retry_after`` (seconds) when waiting helps."""

    def __init__(
        self, quota: str, message: str, hint: str | None, retry_after: float | None
    ) -> None:
        super().__init__(ErrorCode.QUOTA, message, hint, retry_after)
        self.quota = quota
