"""Serves the playground's static files: `GET /playground` (the page) and its script and style.

Owns which files exist (a fixed list, read once from package data: no path from the URL ever
reaches the file system) and their headers: a Content-Security-Policy that lets the page load
only from this origin and call only this origin (the machine may be offline, and no CDN or
third party ever sees a prompt or a key). The page holds no data and needs no key; every call it
makes goes through the OpenAI routes and their API keys. Knows nothing of the coordinator or Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

PAGE = "/playground"
# name -> media type: the only files served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "tokens.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: revalidate each time, so a server upgrade never meets a stale script.
    "Cache-Control": "no-cache",
}


@functools.cache
def read_static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def static_response(name: str) -> Response:
    return Response(read_static(name), media_type=FILES[name], headers=HEADERS)


def mount_playground(app: FastAPI) -> None:
    """Add `GET /playground` (and `/playground/`, and its assets) to `app`."""

    @app.get(PAGE, include_in_schema=False)
    async def page() -> Response:
        return static_response("index.html")

    @app.get(PAGE + "/", include_in_schema=False)
    async def page_slash(request: Request) -> Response:
        # Under a route prefix (a Serve application mounted at /x) the page is /x/playground.
        return RedirectResponse(request.scope.get("root_path", "") + PAGE, status_code=308)

    for name in FILES:
        if name != "index.html":
            app.add_api_route(f"{PAGE}/{name}", _asset(name), methods=["GET"], include_in_schema=False)


def _asset(name: str) -> Callable[[], Awaitable[Response]]:
    # A closure, not a parameter: FastAPI would read a parameter from the query string.
    async def asset() -> Response:
        return static_response(name)

    return asset
