"""Routes Ollama serves itself in the same API (`/v1/messages`, `/v1/responses`): the request
goes on as it came, by Ollama's name for the model, and the answer comes back chunk by
chunk under the name the client asked for."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from services.proxy.serve.engine_errors import reason
from services.proxy.serve.relay import ModelRenamer, relay, whole
from services.proxy.serve.routes import Route
from shared.errors import error_response
from shared.ollama import Ollama


async def answer(request: web.Request, ollama: Ollama, route: Route, payload: dict,
                 ollama_name: str) -> web.StreamResponse:
    name = payload["model"]
    renamer = ModelRenamer(ollama_name, name) if ollama_name != name else None
    try:
        async with ollama.session.post(ollama.base + route.ollama,
                                       data=json.dumps({**payload, "model": ollama_name}),
                                       headers={"Content-Type": "application/json"}) as up:
            if up.status >= 400:
                status = up.status if up.status < 500 else 502
                return error_response(status, f"ollama: {await reason(up)}", "ollama_error")
            if up.content_type != "text/event-stream":
                return await whole(up, renamer)
            return await relay(request, up, [renamer] if renamer else [], route, "Ollama",
                               "Ollama's log says why")
    except aiohttp.ClientConnectorError:
        return error_response(503, str(ollama.unavailable()), "ollama_unavailable")
    except aiohttp.ClientError as e:
        return error_response(502, f"ollama closed the connection before answering ({e})",
                              "ollama_error")
