"""GET /v1/models, GET /v1/models/{model} and GET /health."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import datetime
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.manage.governor_client import governor_health
from services.proxy.peers import listing
from services.proxy.serve.forward import not_found
from shared.catalog import Catalog, Entry
from shared.disk import state_dir_problem
from shared.ollama import OllamaError, OllamaUnavailable
from shared.settings import INSTANCE_ENV, Settings

# Ollama writes nanoseconds; datetime reads at most microseconds
_FRACTION = re.compile(r"(\.\d{6})\d+")


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


def _mtime(path: str) -> int | None:
    try:
        return int(os.stat(os.path.realpath(path)).st_mtime)
    except (OSError, ValueError):
        return None


def created_times(settings: Settings, entries: list[Entry]) -> dict[str, int]:
    """Blocking: id → the Unix time of the model's file (a link's target: the time Ollama
    or LM Studio downloaded it), so each model keeps its own `created` across restarts. A
    `cmd` model has no file: the time of custom_models.yaml, which defines it."""
    config = _mtime(str(settings.custom_models_file)) or 0
    return {e.id: (_mtime(e.path) if e.path else None) or config for e in entries}


def ollama_created(tag: dict) -> int:
    """An Ollama /api/tags row's `modified_at` as a Unix time (0 when it has none)."""
    try:
        stamp = _FRACTION.sub(r"\1", str(tag.get("modified_at", "")).replace("Z", "+00:00"))
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0


async def model_rows(ctx: Context) -> tuple[Catalog, list[dict]]:
    """The catalog and its models as /v1/models lists them, with Ollama's own models that
    no catalog entry serves."""
    await asyncio.to_thread(ctx.holder.refresh)  # a sync that just finished shows at once
    catalog = ctx.holder.catalog
    entries = list(catalog.entries.values())
    states, ollama, created = await asyncio.gather(
        engine_states(ctx), ollama_states(ctx),
        asyncio.to_thread(created_times, ctx.settings, entries))
    tags, ollama_loaded = ollama or ([], {})
    data = []
    for entry in entries:
        if entry.backend == "ollama":
            status = "unknown" if ollama is None else ollama_loaded.get(entry.ollama, "unloaded")
        else:
            status = "unknown" if states is None else states.get(entry.id, "unloaded")
        data.append({
            "id": entry.id, "object": "model", "created": created[entry.id],
            "owned_by": "model-serve", "status": status, "backend": entry.backend,
            "aliases": entry.aliases, "context_length": entry.ctx_size,
        })
    for tag in tags:  # Ollama's own models that no catalog entry serves
        name = tag.get("name", "")
        if name and catalog.resolve(name) is None:
            data.append({"id": name, "object": "model", "created": ollama_created(tag),
                         "owned_by": "ollama", "status": ollama_loaded.get(name, "unloaded"),
                         "backend": "ollama", "aliases": []})
    return catalog, data


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    _, data = await model_rows(ctx)
    data = listing.model_rows(ctx, request, data)
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}, as OpenAI answers it: the model's object from the list, found
    by any of its names (ids hold `/` and `:`, which the SDKs send encoded), or a 404."""
    name = request.match_info["model"]
    catalog, data = await model_rows(request.app[CTX])
    data = listing.model_rows(request.app[CTX], request, data)
    rows = {row["id"]: row for row in data}
    for asked in dict.fromkeys((name, unquote(name))):
        entry = catalog.resolve(asked)
        row = rows.get(entry.id if entry else asked) or rows.get(f"{asked}:latest")
        if row:
            return web.json_response(row)
    return not_found(catalog, name)


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
