"""The OpenAI routes: check the request, find the model, stream the engine's answer back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web

from services.proxy import harmony_route, ollama_routes, request_body, upstream
from services.proxy.context import CTX
from services.proxy.engine_errors import NotLoaded, engine_error
from shared.catalog import Catalog, Entry
from shared.errors import error_response, stream_error
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")
# Headers that describe one hop, or that are ours (the API key), never the engine's.
_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
         "authorization", "x-api-key", "accept-encoding", "upgrade", "te", "trailer",
         "origin", "cookie"}
DONE = b"data: [DONE]"


class ModelRenamer:
    """Rewrites `"model":"<engine name>"` to the name the client asked for, across chunk
    boundaries, holding back only bytes that could start the pattern."""

    def __init__(self, old: str, new: str) -> None:
        self.pattern = b'"model":' + json.dumps(old).encode()
        self.replacement = b'"model":' + json.dumps(new).encode()
        self.tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self.tail + chunk).replace(self.pattern, self.replacement)
        self.tail = b""
        if data.endswith(b"\n"):  # the usual end of an SSE event: nothing to hold back
            return data
        for n in range(min(len(self.pattern) - 1, len(data)), 0, -1):
            if self.pattern.startswith(data[-n:]):
                self.tail = data[-n:]
                return data[:-n]
        return data

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail


def _model_problem(payload: dict) -> web.Response | None:
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        return error_response(400, f"'model' must be a string, got {payload['model']!r}",
                              "invalid_type")
    if not payload.get("model"):
        return error_response(400, "'model' is required: the id of a model from "
                              "GET /v1/models", "missing_model")
    return None


def not_found(catalog: Catalog, name: str) -> web.Response:
    close = catalog.closest(name)
    hint = f"; did you mean {', '.join(close)}?" if close else "; GET /v1/models lists them"
    return error_response(404, f"model {name!r} not found{hint}", "model_not_found",
                          suggestions=close)


def ollama_target(settings: Settings, entry: Entry, path: str) -> str | None:
    """The Ollama name to send this request to, or None for the engine."""
    if entry.backend == "ollama":
        return entry.ollama
    if path == "/v1/embeddings" and entry.ollama:
        names = (entry.id.lower(), entry.ollama.lower())
        if any(word in n for word in settings.embeddings_to_ollama for n in names):
            return entry.ollama
    return None


async def forward(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body, payload, problem = await request_body.read(request)
    if problem or (problem := _model_problem(payload)):
        return problem
    name = payload["model"]
    entry = await ctx.holder.resolve(name)
    target = ollama_target(ctx.settings, entry, request.path) if entry else None
    if entry is None:
        target = await ctx.ollama_models.lookup(name)
        if target is None:
            return not_found(ctx.holder.catalog, name)
    if target and (problem := ollama_routes.fixed_context(payload, entry, target)):
        return problem
    key = ("ollama", target) if target else ("engine", entry.id)
    use_id = entry.id if entry else target
    ctx.usage.start(use_id)
    try:
        if refused := await ctx.admission.ensure(key, entry, use_id):
            return refused
        try:
            return await _answer(request, body, payload, entry, target)
        except NotLoaded:
            # it left (its process ended) before the proxy noticed: load it again, once
            log.info("%s had left the engine; loading it again", entry.id)
            ctx.admission.forget(key)
            if refused := await ctx.admission.ensure(key, entry, use_id):
                return refused
            try:
                return await _answer(request, body, payload, entry, target)
            except NotLoaded as e:
                return e.response
    finally:
        ctx.usage.finish(use_id)


async def _answer(request: web.Request, body: bytes, payload: dict, entry: Entry | None,
                  target: str | None) -> web.StreamResponse:
    if target:
        return await ollama_routes.answer(request, request.app[CTX].ollama, payload, target,
                                          entry)
    if entry.harmony == "proxy" and request.path == "/v1/chat/completions":
        return await harmony_route.chat(request, payload, entry)
    return await to_engine(request, body, payload, entry)


async def to_engine(request: web.Request, body: bytes, payload: dict,
                    entry: Entry) -> web.StreamResponse:
    ctx = request.app[CTX]
    name = payload["model"]
    if name != entry.id:  # by its id: an engine still reading a new config knows no alias yet
        body = json.dumps({**payload, "model": entry.id}).encode()
    engine_name = ctx.engine.response_name(entry)
    renamer = ModelRenamer(engine_name, name) if engine_name != name else None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    headers.update(ctx.engine.headers)
    try:
        async with await upstream.post(ctx, entry, request.path, ctx.engine.url + request.path,
                                       data=body, headers=headers) as up:
            if up.status >= 400:
                return await engine_error(up, entry.path)
            if up.content_type != "text/event-stream":  # one JSON answer: whole, or an error
                data = await up.read()
                if renamer:
                    data = renamer.feed(data) + renamer.flush()
                return web.Response(body=data, status=up.status, content_type=up.content_type,
                                    charset=up.charset)
            return await _relay(request, up, renamer, entry)
    except aiohttp.ClientConnectorError:
        return error_response(503, ctx.engine.unreachable(), "engine_unavailable")
    except aiohttp.ClientError as e:
        return error_response(502, f"the engine closed the connection before answering ({e}); "
                              f"{entry.id} may have crashed: `model logs engine` says why",
                              "engine_error")


async def _relay(request: web.Request, up: aiohttp.ClientResponse,
                 renamer: ModelRenamer | None, entry: Entry) -> web.StreamResponse:
    """Chunk by chunk as the engine sends them. A stream that stops before its `[DONE]`
    (the model's process died, the engine went away) ends with an error event, so the
    client's SDK raises instead of taking a cut answer for a whole one."""
    resp = web.StreamResponse(status=up.status)
    resp.content_type = up.content_type
    if up.charset:
        resp.charset = up.charset
    await resp.prepare(request)
    done, tail = False, b""
    try:
        async for chunk in up.content.iter_any():
            if not done:
                done = DONE in tail + chunk
                tail = chunk[-len(DONE):]
            await resp.write(renamer.feed(chunk) if renamer else chunk)
        cut = None if done else "the engine ended the stream before it was complete"
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        cut = None if done else f"the connection to the engine broke mid-answer ({e})"
    except asyncio.CancelledError:
        # the proxy is stopping and its drain time is over (or the client left): a client
        # still there hears it, so its SDK raises
        if not done:
            with contextlib.suppress(Exception):
                await resp.write(stream_error("model-serve's proxy stopped before the answer "
                                              "was complete; ask again"))
                await resp.write_eof()
        raise
    if renamer:
        await resp.write(renamer.flush())
    if cut:
        log.warning("%s: %s", entry.id, cut)
        await resp.write(stream_error(f"{cut}; {entry.id} may have crashed: `model logs "
                                      "engine` says why"))
    await resp.write_eof()
    return resp
