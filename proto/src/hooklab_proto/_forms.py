"""A union field's failure as one problem a person can act on.

Pydantic reports a value that fits no member of a union once per member ("input.str: should be
a valid string", "input.list[str].0: …", …), so the first line read is usually about a form the
caller never meant. ``one_of`` wraps the union: when the value fits no member, the error names
the forms accepted (with an example) and what was wrong with the member that came closest — the
one whose error lies deepest inside the value.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import ErrorDetails, PydanticCustomError

from ._limits import TOO_LARGE_ERROR

WRONG_FORM_ERROR = "wrong_form"
_TAG_ERRORS = frozenset({"union_tag_not_found", "union_tag_invalid"})


def _position(loc: tuple[int | str, ...]) -> str:
    """``(0, 1)`` → ``[0][1]``; a key → ``.key``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _closest(errors: list[ErrorDetails]) -> str:
    """What was wrong with the member that got furthest: its error's place, message and the
    value found there."""
    deepest = max(errors, key=lambda error: len(error["loc"]))
    place = _position(tuple(deepest["loc"][1:]))  # the first element names the member
    found = repr(deepest.get("input"))
    said = f"{deepest['msg']}, got {found if len(found) <= 40 else found[:37] + '...'}"
    return f"{place}: {said}" if place else said


def one_of(forms: str) -> WrapValidator:
    """Annotate a union with the forms it accepts, e.g. ``one_of('text, or token ids like
    [[464, 2068]]')``. A size refusal and an error inside the one member a tag chose stay as
    they are (they are precise already)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if any(error["type"] == TOO_LARGE_ERROR for error in errors):
                raise
            tags = [error for error in errors if error["type"] in _TAG_ERRORS]
            members = {error["loc"][0] for error in errors if error["loc"]}
            if tags or not errors[0]["loc"]:
                found = tags[0].get("ctx", {}).get("tag") if tags else None
                raise PydanticCustomError(
                    WRONG_FORM_ERROR,
                    "expected {forms}" + (", not '{found}'" if found is not None else ""),
                    {"forms": forms, "found": found},
                ) from None
            if len(members) == 1:  # one member was tried (a tag chose it): its errors are exact
                raise
            raise PydanticCustomError(
                WRONG_FORM_ERROR,
                "expected {forms} ({closest})",
                {"forms": forms, "closest": _closest(errors)},
            ) from None

    return WrapValidator(validate)
