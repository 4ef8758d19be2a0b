"""Ollama's native API on the proxy's port, over every model: the engine's, translated
(ollama_engine), and Ollama's own, passed to Ollama byte by byte. Errors in Ollama's shape,
{"error": "..."}, which its clients raise with."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import importlib.metadata
import json
import logging

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.http import request_body
from services.proxy.manage import metrics
from services.proxy.manage import models as manage
from services.proxy.models.model_turn import with_model
from services.proxy.ollama import engine as ollama_engine
from services.proxy.ollama.convert import keep_alive_zero
from services.proxy.ollama.routes import fixed_context
from services.proxy.ollama.show import (
    file_facts,
    header_kv,
    listed_capabilities,
    listed_name,
    ps_row,
    show,
    tag,
)
from services.proxy.peers import forward as peer_forward
from services.proxy.peers import listing, pick
from services.proxy.serve import routes, upstream
from services.proxy.serve.forward import find, ollama_target, unable
from services.proxy.serve.relay import ModelRenamer
from shared.catalog import Entry
from shared.model_kinds import GENERATE, kind
from shared.ollama import OllamaError, OllamaUnavailable, context, keep_alive

log = logging.getLogger("model-serve.proxy")
# What /api/version says while Ollama is not there to ask: a version its clients accept.
OLLAMA_VERSION = "0.12.0"
try:
    OUR_VERSION = importlib.metadata.version("model-serve")
except importlib.metadata.PackageNotFoundError:
    OUR_VERSION = "unknown"
# Routes served here → the OpenAI route whose backend choice they share (forward.py's).
MODEL_ROUTES = {"/api/chat": "/v1/chat/completions", "/api/generate": "/v1/chat/completions",
                "/api/embed": "/v1/embeddings", "/api/embeddings": "/v1/embeddings"}
# The routes that write text, and what Ollama's refusal for an embedding model calls them.
WRITES = {"/api/chat": "chat", "/api/generate": "generate"}
# Ollama's model management: Ollama's alone, so passed to it.
MANAGEMENT = {"/api/pull": "POST", "/api/push": "POST", "/api/create": "POST",
              "/api/copy": "POST", "/api/delete": "DELETE"}
KNOWN = {"/api/tags", "/api/ps", "/api/show", "/api/version", *MODEL_ROUTES, *MANAGEMENT}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def not_found(ctx: Context, name: str) -> web.Response:
    ollama_names = [m.get("name", "") for m in ctx.ollama_models.models]
    if name in ollama_names:  # Ollama had it when last asked, and does not answer now
        return _ollama_down(ctx)
    close = ctx.holder.catalog.closest(name) + difflib.get_close_matches(name, ollama_names,
                                                                         n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else \
        "; GET /api/tags lists them"
    return error(404, f"model {name!r} not found{hint}")


async def _named(request: web.Request) -> tuple[dict, Entry | None] | web.Response:
    """The JSON body with a `model`, and the catalog's entry for it (None: perhaps one of
    Ollama's own). Older clients say `name`; Ollama's Go CLI sends both, `model` empty."""
    _, payload, problem = await request_body.read(request)
    if problem:
        return problem
    if payload.get("model") in (None, ""):
        payload["model"] = payload.get("name")
    if not isinstance(payload["model"], str) or not payload["model"]:
        return error(400, "model is required")
    return payload, await find(request.app[CTX], payload["model"])


def _ollama_down(ctx: Context) -> web.Response:
    return error(503, str(ctx.ollama.unavailable()))


async def relay(request: web.Request, ctx: Context, data,
                renamer: ModelRenamer | None = None) -> web.StreamResponse:
    """The same request to Ollama, its answer back chunk by chunk as it comes."""
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    try:
        async with ctx.ollama.session.request(request.method, ctx.ollama.base + request.path_qs,
                                              data=data, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            if "Content-Type" in up.headers:
                resp.headers["Content-Type"] = up.headers["Content-Type"]
            await resp.prepare(request)
            last = b""
            try:
                async for chunk in up.content.iter_any():
                    last = (last + chunk)[-metrics.END_BYTES:]  # the last line: eval_count
                    await resp.write(renamer.feed(chunk) if renamer else chunk)
                metrics.answer_end(last)
                if renamer:
                    await resp.write(renamer.flush())
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                if upstream.the_client_left(request):  # its write failed, not Ollama's read
                    raise asyncio.CancelledError from None
                await resp.write(json.dumps({"error": f"ollama: the answer broke off ({e})"})
                                 .encode() + b"\n")
            await resp.write_eof()
            return resp
    except aiohttp.ClientConnectorError:
        return _ollama_down(ctx)


async def _to_ollama(request: web.Request, payload: dict, entry: Entry | None,
                     target: str) -> web.StreamResponse:
    """A model Ollama serves: loaded through admission like on the OpenAI routes, then the
    request as sent, under Ollama's name for the model."""
    ctx = request.app[CTX]
    options = payload.get("options") or {}
    if problem := fixed_context(options if isinstance(options, dict) else {}, entry, target,
                                 request):
        return problem
    name = payload["model"]
    sent = {**payload, "model": target}
    if isinstance(options, dict):  # at the context it was loaded with, or Ollama loads it again
        sent["options"] = {**context(entry), **options}
    if entry and "keep_alive" not in payload and (alive := keep_alive(entry)) is not None:
        sent["keep_alive"] = alive  # the model's TTL, as on the OpenAI routes
    key = ("ollama", target)
    resp = await with_model(request, key, entry, entry.id if entry else target, lambda _: relay(
        request, ctx, json.dumps(sent).encode(),
        ModelRenamer(target, name) if name != target else None))
    if keep_alive_zero(payload.get("keep_alive")):
        ctx.owner.let_go(key)  # Ollama unloads it: the next request loads it again
    return resp


async def model_route(request: web.Request) -> web.StreamResponse:
    """/api/chat, /api/generate, /api/embed, /api/embeddings."""
    ctx = request.app[CTX]
    named = await _named(request)
    if isinstance(named, web.Response):
        return named
    payload, entry = named
    name = payload["model"]
    if entry is None:
        target = await ctx.ollama_models.lookup(
            name, fresh=not pick.listed(ctx, request, name))
        if target is None:
            return await _to_peer(request, payload) or not_found(ctx, name)
        if to := await pick.instead(ctx, request, name, ("ollama", target), None,
                                    request.path):
            return await peer_forward.answer(request, to, name, None, payload, None)
        return await _to_ollama(request, payload, None, target)
    if request.path in WRITES and kind(entry.info, entry.args) != GENERATE:
        # as Ollama answers it, a load-only /api/generate too; before anything is loaded
        return error(400, f"{json.dumps(name)} does not support {WRITES[request.path]}")
    target = ollama_target(ctx.settings, entry, MODEL_ROUTES[request.path])
    key = ("ollama", target) if target else ("engine", entry.id)
    if to := await pick.instead(ctx, request, name, key, entry, request.path):
        return await peer_forward.answer(request, to, name, None, payload, None)
    if target:
        return await _to_ollama(request, payload, entry, target)
    if problem := unable(ctx, routes.ROUTES[MODEL_ROUTES[request.path]], entry, name,
                         request.path):
        return problem
    if request.path in ("/api/embed", "/api/embeddings"):
        return await ollama_engine.embed(request, entry, payload,
                                         request.path == "/api/embeddings")
    return await ollama_engine.generate(request, entry, payload, request.path == "/api/chat")


async def _to_peer(request: web.Request, payload: dict) -> web.StreamResponse | None:
    """A model only a peer serves: its answer (or why not), else None."""
    to = await pick.remote(request.app[CTX], request, payload["model"], request.path)
    if isinstance(to, pick.ToPeer):
        return await peer_forward.answer(request, to, payload["model"], None, payload, None)
    return to


async def _ollama_list(ctx: Context, which: str) -> list[dict]:
    """Ollama's tags or ps; none while Ollama is not there."""
    try:
        async with asyncio.timeout(3):
            return await (ctx.ollama_models.refresh() if which == "tags" else ctx.ollama.ps())
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        return []


async def tags(request: web.Request) -> web.Response:
    """Every model once, and a file Ollama has under several tags once per tag, as Ollama
    lists it: Ollama's rows as Ollama gives them (a file linked from Ollama is listed there,
    under the names it was pulled as), and a row for each other catalog entry, by id; while
    Ollama is down, a linked one has a row per Ollama tag, each of which still answers."""
    ctx = request.app[CTX]
    await asyncio.to_thread(ctx.holder.refresh)  # a sync that just finished shows at once
    ollama = await _ollama_list(ctx, "tags")
    listed = {m.get("name") for m in ollama} - {None}
    rows = [(e, [n for n in e.ollama_tags or [e.ollama or e.id] if n not in listed])
            for e in ctx.holder.catalog.entries.values()]
    shown = [e for e, names in rows if names]
    facts, caps = await asyncio.to_thread(lambda: (file_facts(shown),
                                                   listed_capabilities(shown)))
    return web.json_response({"models": listing.tag_rows(ctx, request, ollama + [
        {**tag(e, name, facts[e.id]), "capabilities": caps[e.id]}
        for e, names in rows for name in names])})


async def ps(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    (rows, _), ollama, listed = await asyncio.gather(
        manage.running_models(ctx), _ollama_list(ctx, "ps"), _ollama_list(ctx, "tags"))
    catalog = ctx.holder.catalog
    loaded = [(catalog.entries[r["id"]], r) for r in rows if r["backend"] == "engine"
              and r["state"] == "loaded" and r["id"] in catalog.entries]
    facts = await asyncio.to_thread(file_facts, [e for e, _ in loaded])
    return web.json_response({"models": [ps_row(e, r, facts[e.id], listed_name(e, listed))
                                         for e, r in loaded] + ollama})


async def show_model(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    named = await _named(request)
    if isinstance(named, web.Response):
        return named
    payload, entry = named
    name = payload["model"]
    if entry and not ollama_target(ctx.settings, entry, "/v1/chat/completions"):
        kv, facts = await asyncio.to_thread(
            lambda: (header_kv(entry.path), file_facts([entry])))
        return web.json_response(show(entry, kv, facts[entry.id][0]))
    target = entry.ollama if entry else await ctx.ollama_models.lookup(name)
    if target is None:
        return await _to_peer(request, payload) or not_found(ctx, name)
    return await relay(request, ctx, json.dumps({**payload, "model": target}).encode())


async def version(request: web.Request) -> web.Response:
    """Ollama's own version while it runs (clients check it for features), else one they
    accept; and ours."""
    ctx = request.app[CTX]
    try:
        async with asyncio.timeout(2):
            theirs = (await ctx.ollama.call("GET", "/api/version")).get("version")
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        theirs = None
    return web.json_response({"version": theirs or OLLAMA_VERSION, "model_serve": OUR_VERSION})


async def management(request: web.Request) -> web.StreamResponse:
    """pull, push, create, copy, delete and blob uploads: Ollama's. The sync service sees
    the manifests change and updates the catalog; Ollama's own list is asked again now."""
    ctx = request.app[CTX]
    resp = await relay(request, ctx, request.content if request.body_exists else None)
    if resp.status < 400:
        with contextlib.suppress(OllamaUnavailable, OllamaError, aiohttp.ClientError,
                                 ValueError):
            await ctx.ollama_models.refresh(force=True)
    return resp


async def unknown(request: web.Request) -> web.Response:
    if request.path in KNOWN:
        return error(405, f"{request.method} {request.path}: method not allowed")
    return error(404, f"{request.method} {request.path}: no such route")
