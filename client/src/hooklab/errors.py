"""Typed exceptions for everything that can go wrong talking to a hooklab server.

Server errors carry the server's machine-readable ``code``, its ``message`` and ``hint``; the
class tells them apart without parsing text.
"""

from __future__ import annotations

from hooklab_proto import TruncatedStreamError, WireFormatError


class HooklabError(Exception):
    """Base class of every hooklab client error."""


class ServerError(HooklabError):
    """The server refused or failed a request (a 4xx/5xx, or an error frame mid-stream)."""

    def __init__(
        self,
        code: str,
        message: str,
        hint: str | None = None,
        status: int = 0,
        request_id: str | None = None,
    ):
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status
        self.request_id = request_id  # names the request in the server's log
        self.retry_after: float | None = None  # seconds, when the server said (429)
        super().__init__(f"{message} ({code}; {hint})" if hint else f"{message} ({code})")


class BadRequestError(ServerError):
    """Malformed body or wrong content type."""


class BadHostError(BadRequestError):
    """The server does not answer to the host name used to reach it (its --allowed-hosts)."""


class MethodNotAllowedError(BadRequestError):
    pass


class BodyTimeoutError(BadRequestError):
    """The request body did not reach the server in time."""


class InvalidRequestError(ServerError):
    """A field, hook spec or index the server cannot accept."""


class UnknownHookError(InvalidRequestError):
    pass


class BadIndexError(InvalidRequestError):
    pass


class BadShapeError(InvalidRequestError):
    pass


class BadDtypeError(InvalidRequestError):
    pass


class BadValueError(InvalidRequestError):
    pass


class ConflictingSpecsError(InvalidRequestError):
    pass


class UnavailableError(ServerError):
    """A part the server needs (Redis, a model's workers) is down; retry later."""


class CallbackFailedError(ServerError):
    """One of this client's hook callbacks raised, timed out or disconnected."""


class TooLargeError(ServerError):
    """Over one of the server's limits (tokens, batch, body or response size)."""


class NotFoundError(ServerError):
    """A stored tensor or cache that does not exist (any more), or an unknown weight."""


class StoreFullError(ServerError):
    pass


class UnsupportedMediaTypeError(BadRequestError):
    pass


class InternalServerError(ServerError):
    pass


class UnauthorizedError(ServerError):
    """No API key was sent, or the server does not know it (revoked?)."""


class QuotaError(ServerError):
    """Over one of the key's quotas; ``retry_after`` (seconds) says when to try again, when
    waiting helps (None: ask for less instead)."""


class QueueFullError(ServerError):
    """The server (or this key's share of it) has too much work queued; try again after
    ``retry_after`` seconds."""


class DeadlineExceededError(ServerError):
    """The work ran past its ``timeout_s`` on the server and was stopped."""


class ConnectionFailedError(HooklabError):
    """The server could not be reached."""


class RequestTimeoutError(HooklabError):
    """The server did not answer within the client's timeout."""


_BY_CODE: dict[str, type[ServerError]] = {
    "bad_request": BadRequestError,
    "bad_host": BadHostError,
    "method_not_allowed": MethodNotAllowedError,
    "request_timeout": BodyTimeoutError,
    "deadline_exceeded": DeadlineExceededError,
    "unauthorized": UnauthorizedError,
    "quota": QuotaError,
    "queue_full": QueueFullError,
    "validation_error": InvalidRequestError,
    "unknown_hook": UnknownHookError,
    "bad_index": BadIndexError,
    "bad_shape": BadShapeError,
    "bad_dtype": BadDtypeError,
    "bad_value": BadValueError,
    "unavailable": UnavailableError,
    "callback_failed": CallbackFailedError,
    "conflicting_specs": ConflictingSpecsError,
    "too_large": TooLargeError,
    "not_found": NotFoundError,
    "store_full": StoreFullError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "internal": InternalServerError,
}


def server_error(
    code: str,
    message: str,
    hint: str | None = None,
    status: int = 0,
    request_id: str | None = None,
) -> ServerError:
    return _BY_CODE.get(code, ServerError)(code, message, hint, status, request_id)


__all__ = [
    "BadDtypeError",
    "BadHostError",
    "BadIndexError",
    "BadRequestError",
    "BadShapeError",
    "BadValueError",
    "BodyTimeoutError",
    "CallbackFailedError",
    "ConflictingSpecsError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "HooklabError",
    "InternalServerError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "QueueFullError",
    "QuotaError",
    "RequestTimeoutError",
    "ServerError",
    "StoreFullError",
    "TooLargeError",
    "TruncatedStreamError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownHookError",
    "UnsupportedMediaTypeError",
    "WireFormatError",
    "server_error",
]
