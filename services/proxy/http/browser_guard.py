"""Which browser pages may drive the proxy.

Any page a user opens can send requests to 127.0.0.1: a cross-site form POST needs no CORS
preflight, and DNS rebinding makes the page's own host name resolve to this machine. So the
proxy answers only the host names it serves, and a request that carries an `Origin` only when
that origin is the proxy itself or one the user listed in CORS_ORIGINS. A request with no
`Origin` (an image tag, a link) that would load or change something is judged by what else the
browser says of the page behind it: `Sec-Fetch-Site`, else `Referer`.
"""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from services.proxy.context import CTX
from shared.errors import error_response
from shared.settings import Settings

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_ORIGIN = "cors_origin"
_ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key, Anthropic-Version, OpenAI-Beta"


def _host_name(host: str) -> str:
    """`Host` header → host name: `[::1]:5846` → `::1`, `LOCALHOST:5846` → `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=256)  # asked on every request, with a few names
def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(settings: Settings, name: str) -> bool:
    """An address needs no check: rebinding works only through a name the attacker owns."""
    return (_is_ip(name) or name in LOCAL_NAMES or name == settings.listen_host.lower()
            or name in settings.allowed_hosts)


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _own_origin(settings: Settings, origin: str, host: str) -> bool:
    """A page the proxy itself served (the dashboard): its own address, as the request names
    it, or one of the stack's names on its port. Any other IP address is another server:
    a page there may send requests here, and browsers do not stop them."""
    parts = urlsplit(origin)
    if parts.scheme in ("http", "https") and parts.netloc and \
            parts.netloc == host.strip().lower():
        return True
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    name = parts.hostname or ""
    return port == settings.proxy_port and (
        name in LOCAL_NAMES or _is_loopback(name) or name in settings.allowed_hosts
        or name == settings.listen_host.lower())


def origin_allowed(settings: Settings, origin: str, host: str) -> bool:
    origin = origin.strip().lower().rstrip("/")
    return origin in settings.cors_origins or _own_origin(settings, origin, host)


def _acts(request: web.Request) -> bool:
    """GETs only read here, except the per-model ones (`?model=`), which load their model."""
    return request.method not in ("GET", "HEAD", "OPTIONS") or "model" in request.query


def _page_origin(request: web.Request) -> str | None:
    """The origin of the page behind a request that names none, when it acts on our behalf
    and the browser says it came from another site (or, where it does not say, its Referer
    does); None for a request from our own pages, typed in, or from a program."""
    if not _acts(request):
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("same-origin", "none"):
        return None
    referer = urlsplit(request.headers.get("Referer", ""))
    if referer.scheme and referer.netloc:
        return f"{referer.scheme}://{referer.netloc}"
    return "(a page of another site)" if site in ("cross-site", "same-site") else None


@web.middleware
async def browser_guard(request: web.Request, handler) -> web.StreamResponse:
    settings = request.app[CTX].settings
    name = _host_name(request.headers.get("Host", ""))
    if name and not host_allowed(settings, name):
        return error_response(403, f"Host {name!r} is not served here; add it to ALLOWED_HOSTS "
                              "if this machine is reached under that name", "host_not_allowed")
    origin = request.headers.get("Origin")
    page = origin if origin is not None else _page_origin(request)
    if page is not None and not origin_allowed(settings, page, request.headers.get("Host", "")):
        return error_response(403, f"requests from the web page at {page} are refused; to "
                              "let a web app use this server, add its origin to CORS_ORIGINS",
                              "origin_not_allowed")
    if origin is not None and request.method == "OPTIONS":
        # an allowed page may send what its SDK sends (openai's X-Stainless-*, anthropic's
        # anthropic-dangerous-direct-browser-access): the headers it asks for are granted
        asked = request.headers.get("Access-Control-Request-Headers", "")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": asked or _ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin, Access-Control-Request-Headers"})
    if origin is not None:
        request[_ORIGIN] = origin
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed answers send their headers before the handler returns."""
    if origin := request.get(_ORIGIN):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
