"""Requests answered by Ollama: chat through /api/chat, embeddings through /api/embed."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from services.proxy.manage import metrics
from services.proxy.ollama import chat as ollama_chat
from shared.catalog import Entry
from shared.errors import error_response, stream_error
from shared.ollama import Ollama, OllamaError, OllamaUnavailable

WARNING_HEADER = "X-Model-Serve-Warning"


class OllamaModels:
    """Ollama's own model list, refreshed at most every few seconds, or at once on a miss."""

    def __init__(self, ollama: Ollama, max_age: float = 5.0) -> None:
        self.ollama = ollama
        self.max_age = max_age
        self.models: list[dict] = []
        self.fetched = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> list[dict]:
        async with self._lock:
            if force or time.monotonic() - self.fetched > self.max_age:
                self.models = await self.ollama.tags()
                self.fetched = time.monotonic()
        return self.models

    async def lookup(self, name: str, fresh: bool = True) -> str | None:
        """Ollama's name for `name`, or None; `gemma3` means `gemma3:latest`. A name not in
        the list is asked of Ollama again at once (a model just pulled), unless `fresh` is
        off (a peer serves that name: its requests would each cost Ollama a listing)."""
        wanted = {name, f"{name}:latest"}
        for force in (False, True) if fresh else (False,):
            try:
                models = await self.refresh(force)
            except OllamaUnavailable:
                return None
            for m in models:
                if m.get("name") in wanted or m.get("model") in wanted:
                    return m.get("name")
        return None


def fixed_context(payload: dict, entry: Entry | None, ollama_name: str,
                  request: web.Request | None = None) -> web.Response | None:
    """A 400 for a request that would make Ollama reload its model at a larger context size:
    that load would happen behind the governor's admission. A context at or below the
    configured one is taken out of `payload` (the model keeps the context it was loaded with,
    which holds the request) and said so in the answer's warning header."""
    configured = entry.ctx_size if entry else None
    for field in ("num_ctx", "ctx_size"):
        asked = payload.get(field)
        if asked is None or asked == configured:
            continue
        if configured and isinstance(asked, int) and not isinstance(asked, bool) and \
                0 < asked <= configured:
            del payload[field]
            if request is not None:
                warn(request, f"{field}={asked} not sent: {ollama_name} keeps the context it "
                     f"was loaded with, {configured}")
            continue
        where = (f"the ctx_size of {entry.id} in custom_models.yaml (now {configured})"
                 if entry else "its num_ctx in Ollama itself (PARAMETER num_ctx in a "
                 "Modelfile)")
        return error_response(
            400, f"{field}={asked!r}: {ollama_name} is served by Ollama, which would reload "
            f"it at that context outside memory admission; set {where} instead",
            "context_fixed")
    return None


_WARNINGS = web.RequestKey("warnings", list)


def warn(request: web.Request, text: str) -> None:
    """A warning for this request's answer, sent in its WARNING_HEADER (warning_header)."""
    request.setdefault(_WARNINGS, []).append(text)


async def warning_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request's warnings join the answer's own."""
    if warnings := request.get(_WARNINGS):
        response.headers[WARNING_HEADER] = "; ".join(
            [*filter(None, [response.headers.get(WARNING_HEADER)]), *warnings])


def _failure(e: Exception) -> web.Response:
    if isinstance(e, OllamaUnavailable):
        return error_response(503, str(e), "ollama_unavailable")
    status = e.status if isinstance(e, OllamaError) and e.status < 500 else 502
    return error_response(status, f"ollama: {e}", "ollama_error")


async def chat(request: web.Request, ollama: Ollama, payload: dict, ollama_name: str,
               entry: Entry | None) -> web.StreamResponse:
    body, warnings = ollama_chat.chat_request(payload, ollama_name, entry)
    model = payload["model"]
    headers = {WARNING_HEADER: "; ".join(warnings)} if warnings else {}
    if not body["stream"]:
        try:
            item = await ollama.call("POST", "/api/chat", body)
        except (OllamaUnavailable, OllamaError) as e:
            return _failure(e)
        if item.get("done") is not True:  # e.g. text that was no valid UTF-8, dropped
            return error_response(502, f"ollama: the answer to {model} ended before it was "
                                  f"done (done: {json.dumps(item.get('done'))}, done_reason: "
                                  f"{json.dumps(item.get('done_reason'))}); Ollama's log may "
                                  "say why", "ollama_error")
        resp = web.json_response(ollama_chat.chat_response(item, model), headers=headers)
        metrics.answer_end(resp.body)
        return resp
    stream = ollama_chat.ChatStream(model)
    resp: web.StreamResponse | None = None
    cut: str | None = "Ollama ended the answer before it was complete"
    try:
        async for item in ollama.stream("/api/chat", body):
            if resp is None:
                resp = web.StreamResponse(headers=headers)
                resp.content_type = "text/event-stream"
                await resp.prepare(request)
            chunk = stream.feed(item)
            await resp.write(chunk)
            if item.get("done"):  # the last chunk, with the usage
                cut = None
                metrics.answer_end(chunk)
    except (OllamaUnavailable, OllamaError) as e:
        if resp is None:
            return _failure(e)
        cut = f"ollama: {e}"
    if resp is None:
        return error_response(502, "ollama: empty answer", "ollama_error")
    if cut:
        await resp.write(stream_error(cut))
    await resp.write_eof()
    return resp


async def embeddings(ollama: Ollama, payload: dict, ollama_name: str,
                     entry: Entry | None) -> web.Response:
    try:
        item = await ollama.call("POST", "/api/embed",
                                     ollama_chat.embed_request(payload, ollama_name, entry))
    except (OllamaUnavailable, OllamaError) as e:
        return _failure(e)
    return web.json_response(ollama_chat.embed_response(item, payload["model"]))


async def answer(request: web.Request, ollama: Ollama, payload: dict, ollama_name: str,
                 entry: Entry | None) -> web.StreamResponse:
    """The routes of routes.OLLAMA_TRANSLATED; the rest were refused before loading."""
    if request.path == "/v1/chat/completions":
        return await chat(request, ollama, payload, ollama_name, entry)
    return await embeddings(ollama, payload, ollama_name, entry)
