"""GET /v1/models and GET /health."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context

CREATED = int(time.time())


async def engine_states(ctx: Context) -> dict[str, str] | None:
    """Loaded models by id, or None when the engine does not answer in time."""
    try:
        async with asyncio.timeout(3):
            return await ctx.engine.loaded(ctx.session, ctx.holder.catalog)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    states = await engine_states(ctx)
    data = []
    for entry in ctx.holder.catalog.entries.values():
        status = "unknown" if states is None else states.get(entry.id, "unloaded")
        data.append({
            "id": entry.id, "object": "model", "created": CREATED, "owned_by": "model-serve",
            "status": status, "backend": entry.backend, "aliases": entry.aliases,
            "context_length": entry.ctx_size,
        })
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    states = await engine_states(ctx)
    engine = {"name": ctx.engine.name, "url": ctx.engine.url, "ok": states is not None}
    if states is not None:
        engine["loaded"] = sorted(states)
    ok = states is not None
    body = {"status": "ok" if ok else "degraded", "proxy": "ok", "engine": engine,
            "models": len(ctx.holder.catalog.entries)}
    return web.json_response(body, status=200 if ok else 503)
