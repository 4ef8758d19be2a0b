"""Each family of routes answers errors in the shape its clients parse: Anthropic's on the
Anthropic routes, Ollama's on /api/*, OpenAI's everywhere else. Every error the proxy makes
is OpenAI-shaped; this middleware, outside all the others, reshapes it, so a 401, a 413 or a
refused web page reads right to every client."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from services.proxy.apis import anthropic_errors
from services.proxy.serve.routes import ANTHROPIC_PATHS


def ollama_body(status: int, message: str) -> dict:
    return {"error": message}


def _shape(path: str) -> Callable[[int, str], dict] | None:
    if path in ANTHROPIC_PATHS:
        return anthropic_errors.error_body
    if path.startswith("/api/"):
        return ollama_body
    return None


def _reshaped(response: web.Response, shape: Callable[[int, str], dict]) -> web.Response:
    """An OpenAI-shaped error in `shape`, its other headers (Retry-After) kept; anything
    else as it is."""
    try:
        message = json.loads(response.body)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return response
    return web.json_response(shape(response.status, message), status=response.status,
                             headers={k: v for k, v in response.headers.items()
                                      if k.lower() not in ("content-type", "content-length")})


@web.middleware
async def error_shapes(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if response.status >= 400 and isinstance(response, web.Response) and \
            isinstance(response.body, bytes) and (shape := _shape(request.path)):
        return _reshaped(response, shape)
    return response
