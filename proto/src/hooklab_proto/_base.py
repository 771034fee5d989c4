"""The base of every request body model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    """Unknown fields are refused; validation is strict ("60" is not a number, true is not an
    index) and no float may be NaN or infinite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
