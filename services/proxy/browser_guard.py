"""Which browser pages may drive the proxy.

Any page a user opens can send requests to 127.0.0.1: a cross-site form POST needs no CORS
preflight, and DNS rebinding makes the page's own host name resolve to this machine. So the
proxy answers only the host names it serves, and a request that carries an `Origin` only when
that origin is the proxy itself or one the user listed in CORS_ORIGINS.
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


def _own_origin(settings: Settings, origin: str) -> bool:
    """A page served by the proxy itself (the dashboard)."""
    parts = urlsplit(origin)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return bool(parts.hostname) and port == settings.proxy_port and \
        host_allowed(settings, parts.hostname)


def origin_allowed(settings: Settings, origin: str) -> bool:
    origin = origin.strip().lower().rstrip("/")
    return origin in settings.cors_origins or _own_origin(settings, origin)


@web.middleware
async def browser_guard(request: web.Request, handler) -> web.StreamResponse:
    settings = request.app[CTX].settings
    name = _host_name(request.headers.get("Host", ""))
    if name and not host_allowed(settings, name):
        return error_response(403, f"Host {name!r} is not served here; add it to ALLOWED_HOSTS "
                              "if this machine is reached under that name", "host_not_allowed")
    origin = request.headers.get("Origin")
    cross_site = request.headers.get("Sec-Fetch-Site") == "cross-site"
    if origin is None and cross_site and request.method not in ("GET", "HEAD"):
        origin = "(a cross-site page)"
    if origin is not None and not origin_allowed(settings, origin):
        return error_response(403, f"requests from the web page at {origin} are refused; to "
                              "let a web app use this server, add its origin to CORS_ORIGINS",
                              "origin_not_allowed")
    if origin is not None and request.method == "OPTIONS":
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOW_HEADERS,
            "Access-Control-Max-Age": "600", "Vary": "Origin"})
    if origin is not None:
        request[_ORIGIN] = origin
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed answers send their headers before the handler returns."""
    if origin := request.get(_ORIGIN):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
