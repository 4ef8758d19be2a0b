"""GET /: the dashboard for a browser, "Ollama is running" for Ollama's clients, which probe
it; told apart by what the request accepts. The page's files are served as they are: no build
step, nothing fetched from the internet."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.proxy.context import CTX
from services.proxy.manage import events
from shared.errors import error_response

FILES = Path(__file__).with_name("dashboard")
# the page and its files carry no data; the data routes they call need the API key when set
OPEN_PREFIX = "/dashboard/"
ASSETS = {"dashboard.css", "dashboard.js"}
_NO_STORE = {"Cache-Control": "no-store"}  # an updated stack serves its updated page


async def home(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", ""):
        return web.FileResponse(FILES / "index.html", headers=_NO_STORE)
    return web.Response(text="Ollama is running")


async def feed(request: web.Request) -> web.StreamResponse:
    """GET /events: live (server-sent events) for a reader that accepts them, else the recent
    ones as JSON (`model top`, curl); either way only those after Last-Event-ID or ?since=."""
    given = request.headers.get("Last-Event-ID") or request.query.get("since") or "0"
    if not given.isascii() or not given.isdigit():
        return error_response(400, f"since (or Last-Event-ID) must be an event id, a "
                              f"non-negative integer, not {given!r}", "invalid_request")
    stream = request.app[CTX].metrics.events
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await events.feed(request, stream, int(given))
    return web.json_response({"events": stream.since(int(given))})


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(FILES / name, headers=_NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_get("/events", feed)
    app.router.add_get(OPEN_PREFIX + "{name}", asset)
