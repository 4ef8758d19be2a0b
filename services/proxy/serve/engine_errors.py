"""An engine's error answer, as an OpenAI-shaped error with the engine's own reason."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from shared.errors import error_response

# What the router answers for a model it holds no process for (it runs --no-models-autoload).
NOT_LOADED = "model is not loaded"
# llama-server's 500 for media a model without a projector cannot take ("image input is not
# supported - hint: ... provide the mmproj"): the request's fault, so a 400
NO_MEDIA = ("image input is not supported", "audio input is not supported")


class NotLoaded(Exception):
    """The engine no longer holds the model the proxy thought was loaded."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(NOT_LOADED)
        self.response = response


async def reason(up: aiohttp.ClientResponse) -> str:
    """The message of an error answer: `{"error": {"message"}}`, `{"error": "..."}` (and
    Anthropic's shape, which has the same keys), else its text."""
    text = await up.text(errors="replace")
    try:
        err = json.loads(text)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return text.strip()[:2000] or up.reason or "no reason given"


async def engine_error(up: aiohttp.ClientResponse, entry_path: str,
                       route: str = "") -> web.Response:
    """The client's error response; NotLoaded when the model has left the engine. `route`
    ("<model> <path>") names what was asked of a model whose server does not offer it."""
    message = await reason(up)
    status = up.status
    if "failed to load" in message and entry_path:
        message += f" (model file: {entry_path}; the engine log has the details)"
    elif message.startswith("proxy error"):  # the router lost the model's own server
        status = 502
        message += "; the model's process may have crashed: `model logs engine` says why"
    elif status == 501 and route:  # a route this model's llama-server does not offer
        # 400: asking again cannot help, and the SDKs retry a 5xx
        status, message = 400, f"{route}: {message}"
        if "Start it with" in message:  # a flag turns it on
            message += "; llama-server flags go in the model's sampler_args in " \
                       "custom_models.yaml"
    elif status == 500 and message.startswith(NO_MEDIA):
        status = 400  # asking again cannot help, and the SDKs retry a 5xx
    response = error_response(status, f"engine: {message}", "engine_error")
    if up.status == 400 and message == NOT_LOADED:
        raise NotLoaded(response)
    return response
