"""The teaching page (issue 16): the static files of ``hooklab_server/web`` — plain HTML, CSS
and ES modules, no build step — served at ``/`` and ``/ui/…``. The page calls the same public
JSON API as any other client; these routes only hand out its files, open to every caller (the
page itself asks for an API key when the server has keys: ``edge.OPEN_PATHS``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from hooklab_proto import ErrorCode

from ..ops import RequestError
from .running import HooklabRoute

WEB = Path(__file__).resolve().parents[1] / "web"
UI_PREFIX = "/ui/"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads only its own files and talks only to this server: no inline script, no other
# origin, not framed by another site.
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidated on every load: a server upgrade shows its page at once.
    "cache-control": "no-cache",
}

router = APIRouter(route_class=HooklabRoute, include_in_schema=False)


def web_files() -> dict[str, Path]:
    """Every file the page may load, by its path under /ui/ (nothing outside ``WEB``)."""
    return {
        path.relative_to(WEB).as_posix(): path
        for path in sorted(WEB.rglob("*"))
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


async def _file(path: Path) -> Response:
    body = await run_in_threadpool(path.read_bytes)
    return Response(body, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> Response:
    """The teaching page."""
    return await _file(WEB / "index.html")


@router.api_route(UI_PREFIX + "{name:path}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    """One of the page's files (styles, modules)."""
    found = web_files().get(name)
    if found is None:
        raise RequestError(ErrorCode.NOT_FOUND, f"no file {name[:100]!r} in the page's files")
    return await _file(found)
