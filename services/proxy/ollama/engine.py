"""Ollama-API requests for models the engine serves: translated to the engine's OpenAI
routes, sent the way forward.py sends (usage counted, admission and loading, the model's
own server while warm, one retry when it left) and answered in Ollama's shapes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.models.model_turn import with_model
from services.proxy.ollama import truncate
from services.proxy.ollama.convert import (
    Answer,
    BadRequest,
    Stats,
    Stream,
    chat_body,
    embed_answer,
    generate_body,
    keep_alive_zero,
    line,
)
from services.proxy.ollama.routes import WARNING_HEADER
from services.proxy.serve import upstream
from services.proxy.serve.engine_errors import engine_error
from shared.catalog import Entry
from shared.errors import error_response

log = logging.getLogger("model-serve.proxy")


async def unload(ctx: Context, entry: Entry) -> None:
    """keep_alive 0: out of memory now, as `model unload` does it, unless other requests
    still use it."""
    key = ("engine", entry.id)
    if not ctx.owner.warm(key) or ctx.owner.busy(entry.id):
        return
    if error := await ctx.owner.unload(key, entry.id, "manual", "keep_alive 0"):
        log.warning("keep_alive 0: could not unload %s: %s", entry.id, error.message)
    # an unload is logged once, by the owner: "unloaded <id> from engine (manual): keep_alive 0"


# What fits a refused prompt: (the model, the body, the tokens it may have) → (body, note).
Fit = Callable[[truncate.Model, dict, int], Awaitable[tuple[dict, str]]]
Read = Callable[[aiohttp.ClientResponse, dict], Awaitable[web.StreamResponse]]


async def _post(request: web.Request, entry: Entry, path: str, body: dict, read: Read,
                fit: Fit | None = None, truncating: bool = True,
                refusal: tuple[int, str] | None = None) -> web.StreamResponse:
    """The engine's answer, read by `read` (with the headers to answer with). A prompt the
    engine refuses for its length is cut to fit by `fit` and sent once more, as Ollama cuts
    it; with `truncating` off (`truncate: false`), the refusal is Ollama's: `refusal`
    (status, message), else llama-server's own error as the message, with its status."""
    ctx = request.app[CTX]
    headers: dict[str, str] = {}
    try:
        for attempt in (1, 2):
            async with await upstream.post(ctx, entry, path, ctx.engine.route_url(entry, path),
                                           body.get("stream") is True, json=body,
                                           headers=ctx.engine.headers) as up:
                if up.status < 400:
                    return await read(up, headers)
                refused = truncate.overflow(up.status, await up.text(errors="replace")) \
                    if fit and attempt == 1 else None
                if refused is None:
                    return await engine_error(up, entry.path)
            status, message = refusal or (up.status, refused.text)
            if not truncating:
                return web.json_response({"error": message}, status=status)
            try:
                body, note = await fit(truncate.Model(ctx, entry), body, refused.limit)
            except truncate.Unfit as e:
                log.warning("%s: the prompt is longer than its context and was not cut: %s",
                            entry.id, e)
                return web.json_response({"error": message}, status=status)
            log.info("%s: %s %s (Ollama's truncate; the engine said: %s)", entry.id,
                     request.path, note, json.loads(refused.text)["error"].get("message"))
            headers[WARNING_HEADER] = f"the prompt was longer than {entry.id}'s context " \
                                      f"({refused.limit} tokens): {note}"
        raise AssertionError("unreachable")  # the second attempt returns
    except aiohttp.ClientError as e:
        return upstream.failure(request, entry, e)


async def _relay(request: web.Request, up: aiohttp.ClientResponse, stream: Stream,
                 entry: Entry, headers: dict) -> web.StreamResponse:
    """Each engine event as it arrives becomes a line; a stream that breaks off ends with an
    error line, on which Ollama's clients raise."""
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/x-ndjson"
    await resp.prepare(request)
    cut: str | None = "the engine ended the stream before it was complete"
    try:
        async for raw in up.content:  # server-sent events: one field per line
            if raw.startswith(b"error: "):
                cut = f"engine: {raw[7:].decode(errors='replace').strip()}"
                break
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:].strip()
            if data == b"[DONE]":
                cut = None
                break
            if out := stream.feed(json.loads(data)):
                await resp.write(out)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        if upstream.the_client_left(request):  # its write failed, not the model's read
            raise asyncio.CancelledError from None
        cut = f"the connection to the engine broke mid-answer ({e})"
    except ValueError as e:
        cut = f"the engine sent an event that is not JSON ({e})"
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await resp.write(line({"error": "model-serve's proxy stopped before the answer "
                                            "was complete; ask again"}))
            await resp.write_eof()
        raise
    if cut:
        log.warning("%s: %s", entry.id, cut)
        await resp.write(line({"error": f"{cut}; {entry.id} may have crashed: `model logs "
                                        "engine` says why"}))
    else:
        await resp.write(stream.end())
    await resp.write_eof()
    return resp


def _is_empty(payload: dict, chat: bool) -> bool:
    """No prompt at all: Ollama's way to load a model, or with keep_alive 0 to unload it."""
    return not (payload.get("messages") if chat else payload.get("prompt"))


async def generate(request: web.Request, entry: Entry, payload: dict,
                   chat: bool) -> web.StreamResponse:
    """/api/chat (chat) or /api/generate for a model of the engine's."""
    ctx = request.app[CTX]
    name, stream = payload["model"], payload.get("stream") is not False  # Ollama streams
    if entry.harmony == "proxy":
        return error_response(400, f"{name} speaks Harmony, which the proxy renders only for "
                              "/v1/chat/completions: use that route for it", "unsupported_route")
    unloading = keep_alive_zero(payload.get("keep_alive"))
    answer = Answer(name, chat, payload.get("think"), Stats(0))
    if _is_empty(payload, chat):
        if unloading:
            await unload(ctx, entry)
            return web.json_response(answer.loaded("unload"))

        async def loaded(load: float) -> web.StreamResponse:
            return web.json_response(answer.loaded("load"))
        return await with_model(request, ("engine", entry.id), entry, entry.id, loaded)
    try:
        path, body = ("/v1/chat/completions", chat_body(payload, entry, stream)) if chat \
            else generate_body(payload, entry, stream)
    except BadRequest as e:
        return error_response(400, str(e), "invalid_request")

    async def read(up: aiohttp.ClientResponse, headers: dict) -> web.StreamResponse:
        if stream:
            return await _relay(request, up, Stream(answer), entry, headers)
        return web.json_response(answer.whole(await up.json(content_type=None)),
                                 headers=headers)

    fit = truncate.fit_chat if path == "/v1/chat/completions" else truncate.fit_completion

    async def call(load: float) -> web.StreamResponse:
        answer.stats = Stats(load)
        return await _post(request, entry, path, body, read, fit, truncate.allowed(payload))

    resp = await with_model(request, ("engine", entry.id), entry, entry.id, call)
    if unloading:
        await unload(ctx, entry)
    return resp


async def embed(request: web.Request, entry: Entry, payload: dict,
                legacy: bool) -> web.StreamResponse:
    """/api/embed (`input`: one text or a list), or the older /api/embeddings (`prompt`)."""
    given = payload.get("prompt" if legacy else "input")
    if not (isinstance(given, str) or (isinstance(given, list) and given and
                                       all(isinstance(t, str) for t in given))):
        field = "prompt" if legacy else "input"
        return error_response(400, f"{field} must be a text" + ("" if legacy else
                              " or a list of texts"), "invalid_request")
    body = {"model": entry.id, "input": given}

    async def call(load: float) -> web.StreamResponse:
        async def read(up: aiohttp.ClientResponse, headers: dict) -> web.StreamResponse:
            answer = embed_answer(await up.json(content_type=None), payload["model"],
                                  Stats(load))
            if legacy:
                return web.json_response({"embedding": (answer["embeddings"] or [[]])[0]},
                                         headers=headers)
            return web.json_response(answer, headers=headers)
        # Ollama cuts nothing for the older route, and refuses with a 500 there
        return await _post(request, entry, "/v1/embeddings", body, read, truncate.fit_embed,
                           not legacy and truncate.allowed(payload),
                           (500 if legacy else 400, truncate.TOO_LONG))

    resp = await with_model(request, ("engine", entry.id), entry, entry.id, call)
    if keep_alive_zero(payload.get("keep_alive")):
        await unload(request.app[CTX], entry)
    return resp
