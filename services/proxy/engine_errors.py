"""An engine's error answer, as an OpenAI-shaped error with the engine's own reason."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from shared.errors import error_response


async def engine_error(up: aiohttp.ClientResponse, entry_path: str) -> web.Response:
    text = await up.text(errors="replace")
    try:
        err = json.loads(text)["error"]
        message = err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:2000] or up.reason or "no reason given"
    if "failed to load" in message and entry_path:
        message += f" (model file: {entry_path}; the engine log has the details)"
    return error_response(up.status, f"engine: {message}", "engine_error")
