"""Size limits applied while a body is validated, before its items are.

A server validates bodies with ``model_validate(data, context=limits_context(limits))``; each
bounded field then refuses an oversize list *before* pydantic looks at its items, so a body of a
million hook specs costs one length check, not a million validations (and a million errors).
Without a context (a client building a request) nothing is bounded here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BeforeValidator, ValidationInfo
from pydantic_core import PydanticCustomError

# The error type of an oversize field; the server maps it to ErrorCode.TOO_LARGE.
TOO_LARGE_ERROR = "too_large"
_CONTEXT_KEY = "hooklab_limits"


def limits_context(limits: Mapping[str, int]) -> dict[str, Any]:
    return {_CONTEXT_KEY: limits}


def _limit(info: ValidationInfo, name: str) -> int | None:
    context = info.context
    if not isinstance(context, dict) or _CONTEXT_KEY not in context:
        return None
    return context[_CONTEXT_KEY].get(name)


def _too_large(what: str, count: int, limit: int, name: str) -> PydanticCustomError:
    return PydanticCustomError(
        TOO_LARGE_ERROR,
        "{count} {what} exceed the limit of {limit} (server setting {name})",
        {"count": count, "what": what, "limit": limit, "name": name},
    )


def bounded_length(limit_name: str, what: str) -> BeforeValidator:
    """Refuse a list longer than the server's ``limit_name`` before validating its items."""

    def check(value: Any, info: ValidationInfo) -> Any:
        limit = _limit(info, limit_name)
        if limit is not None and isinstance(value, list | tuple | dict) and len(value) > limit:
            raise _too_large(what, len(value), limit, limit_name)
        return value

    return BeforeValidator(check)


def bounded_ids(limit_name: str = "max_tokens", what: str = "tokens") -> BeforeValidator:
    """Refuse nested id lists holding more values than ``limit_name`` (a list of lists counts
    every inner value), before each id is validated."""

    def check(value: Any, info: ValidationInfo) -> Any:
        limit = _limit(info, limit_name)
        if limit is None or not isinstance(value, list):
            return value
        count = sum(len(row) if isinstance(row, list) else 1 for row in value)
        if count > limit:
            raise _too_large(what, count, limit, limit_name)
        return value

    return BeforeValidator(check)
