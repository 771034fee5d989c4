"""Service limits and options, set from the command line or the environment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 16384  # batch * pos of one request
    max_batch: int = 64
    max_request_bytes: int = 64 * 2**20
    max_response_bytes: int = 4 * 2**30
    max_stored_bytes: int = 2 * 2**30
    store_ttl_s: float = 3600.0
