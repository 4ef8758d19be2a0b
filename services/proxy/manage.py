"""The management API: GET /running, POST /models/unload, POST /models/load."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from shared.catalog import Entry
from shared.engines import EngineError
from shared.errors import error_response
from shared.memory import Footprints, rss_by_port, system_reading
from shared.ollama import OllamaError, OllamaUnavailable


async def _ollama_loaded(ctx: Context) -> dict[str, int]:
    """Ollama name → size of each model Ollama holds; empty when Ollama is not there."""
    try:
        async with asyncio.timeout(3):
            return {m.get("name", ""): int(m.get("size", 0)) for m in await ctx.ollama.ps()}
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def running_models(ctx: Context) -> list[dict]:
    catalog = ctx.holder.catalog
    try:
        async with asyncio.timeout(5):
            engine = await ctx.engine.running(ctx.session, catalog)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        engine = {}
    ollama = await _ollama_loaded(ctx)
    ports = {mid: r.port for mid, r in engine.items() if r.port}
    rss, footprints = await asyncio.gather(
        asyncio.to_thread(rss_by_port, ports),
        asyncio.to_thread(Footprints, ctx.settings.footprints_file))
    now = time.time()
    out = []

    def row(mid: str, entry: Entry | None, backend: str, state: str, measured: int | None):
        use = ctx.usage.models.get(mid)
        last = use.last_used if use and use.last_used else None
        ttl = entry.ttl if entry else None
        out.append({
            "id": mid, "backend": backend, "state": state,
            "last_used": last, "idle_seconds": round(now - last, 1) if last else None,
            "in_flight": use.in_flight if use else 0,
            "requests": use.requests if use else 0,
            "ttl": ttl, "expires_at": last + ttl if last and ttl else None,
            "memory": {"estimated": footprints.estimate(entry) if entry else None,
                       "measured": measured},
            "pinned": bool(entry and entry.pin),
            "context_length": entry.ctx_size if entry else None,
            "parallel": entry.parallel if entry else None,
        })

    for mid, r in engine.items():
        row(mid, catalog.entries.get(mid), "engine", r.state, rss.get(mid))
    for name, size in ollama.items():
        entry = next((e for e in catalog.entries.values() if e.ollama == name), None)
        row(entry.id if entry else name, entry, "ollama", "loaded", size)
    return out


async def running(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    reading = await asyncio.to_thread(system_reading)
    return web.json_response({
        "models": await running_models(ctx),
        "system": {"total": reading.total, "available": reading.available,
                   "used_pct": round(reading.used_pct, 1)}})


async def _requested(request: web.Request) -> tuple[Entry | None, str | None, dict] | \
        web.Response:
    """The model a management call names: its catalog entry and/or its Ollama name."""
    ctx = request.app[CTX]
    try:
        body = await request.json()
        name = body.get("model") if isinstance(body, dict) else None
    except ValueError:
        name = None
    if not isinstance(name, str) or not name:
        return error_response(400, 'expected a JSON body {"model": "<id>"}', "missing_model")
    entry = await ctx.holder.resolve(name)
    ollama_name = (entry.ollama if entry.backend == "ollama" else None) if entry else \
        await ctx.ollama_models.lookup(name)
    if entry is None and ollama_name is None:
        return error_response(404, f"model {name!r} not found", "model_not_found",
                              suggestions=ctx.holder.catalog.closest(name))
    return entry, ollama_name, body


async def unload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, body = found
    mid = entry.id if entry else ollama_name
    use = ctx.usage.models.get(mid)
    if use and use.in_flight and not body.get("force"):
        return error_response(409, f"{mid} is serving {use.in_flight} request(s); "
                              'send "force": true to unload it anyway', "model_busy")
    try:
        if ollama_name:
            await ctx.ollama.unload(ollama_name)
        else:
            await ctx.engine.unload(ctx.session, entry)
    except (OllamaUnavailable, OllamaError) as e:
        return error_response(503, str(e), "ollama_unavailable")
    except (EngineError, aiohttp.ClientError) as e:
        return error_response(503, f"engine: {e}", "engine_error")
    ctx.admission.forget(mid)
    return web.json_response({"model": mid, "unloaded": True})


async def load(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, _ = found
    if entry is None:  # one of Ollama's own models: Ollama loads it on an empty request
        try:
            await ctx.ollama.call("POST", "/api/generate", {"model": ollama_name})
        except (OllamaUnavailable, OllamaError) as e:
            return error_response(503, str(e), "ollama_unavailable")
        return web.json_response({"model": ollama_name, "loaded": True})
    refused = await ctx.admission.ensure(entry)
    if refused:
        return refused
    return web.json_response({"model": entry.id, "loaded": True})
