"""GET /v1/models and GET /health."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.manage.governor_client import governor_health
from shared.disk import state_dir_problem
from shared.ollama import OllamaError, OllamaUnavailable
from shared.settings import INSTANCE_ENV

CREATED = int(time.time())


async def engine_states(ctx: Context) -> dict[str, str] | None:
    """Loaded models by id, or None when the engine does not answer in time."""
    try:
        async with asyncio.timeout(3):
            return await ctx.engine.loaded(ctx.session, ctx.holder.catalog)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def ollama_states(ctx: Context) -> tuple[list[dict], dict[str, str]] | None:
    """Ollama's models and which are loaded, or None when Ollama does not answer."""
    try:
        async with asyncio.timeout(3):
            tags = await ctx.ollama_models.refresh()
            loaded = {m.get("name", ""): "loaded" for m in await ctx.ollama.ps()}
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return tags, loaded


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    await asyncio.to_thread(ctx.holder.refresh)  # a sync that just finished shows at once
    catalog = ctx.holder.catalog
    states, ollama = await asyncio.gather(engine_states(ctx), ollama_states(ctx))
    tags, ollama_loaded = ollama or ([], {})
    data = []
    for entry in catalog.entries.values():
        if entry.backend == "ollama":
            status = "unknown" if ollama is None else ollama_loaded.get(entry.ollama, "unloaded")
        else:
            status = "unknown" if states is None else states.get(entry.id, "unloaded")
        data.append({
            "id": entry.id, "object": "model", "created": CREATED, "owned_by": "model-serve",
            "status": status, "backend": entry.backend, "aliases": entry.aliases,
            "context_length": entry.ctx_size,
        })
    for tag in tags:  # Ollama's own models that no catalog entry serves
        name = tag.get("name", "")
        if name and catalog.resolve(name) is None:
            data.append({"id": name, "object": "model", "created": CREATED,
                         "owned_by": "ollama", "status": ollama_loaded.get(name, "unloaded"),
                         "backend": "ollama", "aliases": []})
    return web.json_response({"object": "list", "data": data})


async def governor_state(ctx: Context) -> dict:
    """The governor's own /health in brief; when it does not answer, models still load and
    serve (the proxy admits them), but nothing unloads idle ones."""
    body = await governor_health(ctx.session, ctx.settings)
    if body is None:
        return {"url": ctx.settings.governor_url, "ok": False, "status": "down",
                "problem": "not answering: idle models stay past their TTL and memory "
                           "pressure is not watched"}
    return {"url": ctx.settings.governor_url, "ok": body.get("status") == "ok",
            "status": body.get("status"), "problem": body.get("problem"),
            "note": (body.get("memory") or {}).get("note")}


async def health(request: web.Request) -> web.Response:
    """200 while the proxy can serve (the engine answers); `status` says "degraded" when the
    governor is down or cannot decide, or when `warnings` name what serving survives (a full
    STATE_DIR)."""
    ctx = request.app[CTX]
    states, ollama, governor, disk = await asyncio.gather(
        engine_states(ctx), ollama_states(ctx), governor_state(ctx),
        asyncio.to_thread(state_dir_problem, ctx.settings))
    engine = {"name": ctx.engine.name, "url": ctx.engine.url, "ok": states is not None}
    if states is not None:
        engine["loaded"] = sorted(states)
    ok = states is not None
    # memory over the limit that unloading cannot help (other programs hold it)
    warnings = [w for w in (disk, governor.get("note")) if w]
    body = {"status": "ok" if ok and governor["ok"] and not warnings else "degraded",
            "proxy": "ok", "engine": engine, "governor": governor, "warnings": warnings,
            "ollama": {"url": ctx.settings.ollama_base, "ok": ollama is not None},
            "models": len(ctx.holder.catalog.entries),
            # which stack answers: `model start` and `model status` trust only their own
            "instance": os.environ.get(INSTANCE_ENV), "state_dir": str(ctx.settings.state_dir)}
    return web.json_response(body, status=200 if ok else 503)
