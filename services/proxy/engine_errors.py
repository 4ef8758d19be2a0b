"""An engine's error answer, as an OpenAI-shaped error with the engine's own reason."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from shared.errors import error_response

# What the router answers for a model it holds no process for (it runs --no-models-autoload).
NOT_LOADED = "model is not loaded"


class NotLoaded(Exception):
    """The engine no longer holds the model the proxy thought was loaded."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(NOT_LOADED)
        self.response = response


async def engine_error(up: aiohttp.ClientResponse, entry_path: str) -> web.Response:
    """The client's error response; NotLoaded when the model has left the engine."""
    text = await up.text(errors="replace")
    try:
        err = json.loads(text)["error"]
        message = err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:2000] or up.reason or "no reason given"
    status = up.status
    if "failed to load" in message and entry_path:
        message += f" (model file: {entry_path}; the engine log has the details)"
    elif message.startswith("proxy error"):  # the router lost the model's own server
        status = 502
        message += "; the model's process may have crashed: `model logs engine` says why"
    response = error_response(status, f"engine: {message}", "engine_error")
    if up.status == 400 and message == NOT_LOADED:
        raise NotLoaded(response)
    return response
