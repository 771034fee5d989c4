"""``python -m hooklab_server.api.export_openapi [path]``: /openapi.json as the server serves it,
with sorted keys (``make openapi`` writes proto/openapi.json, the contract other languages
generate clients from; a test keeps it equal to what a server serves)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..models import ModelEntry
from . import create_app


class _NoModels:
    """The routes without a model behind them: the document depends on the routes alone."""

    async def get(self, name: str | None) -> ModelEntry:
        raise LookupError("this app describes its routes; it serves no model")

    async def listing(self) -> list[ModelEntry]:
        return []

    async def problem(self) -> str | None:
        return "no model: this app only describes its routes"

    async def aclose(self) -> None:
        return None


def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = create_app(models=_NoModels()).openapi()
    return document


def openapi_text() -> str:
    """The document as the exported file holds it: sorted keys, two-space indents."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = openapi_text()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
