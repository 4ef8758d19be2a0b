"""The management API: GET /running, POST /models/unload, POST /models/load, and the sync's
POST /engine/hold."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.http import request_body
from services.proxy.manage.governor_client import governor_health
from services.proxy.manage.metrics import unload_reason
from services.proxy.models.engine_hold import LONGEST_HOLD
from services.proxy.serve.forward import find, forward, not_found
from shared.catalog import Entry
from shared.engine_key import HEADER
from shared.engines import EngineError
from shared.errors import error_response
from shared.loading import Key
from shared.memory import Footprints, account
from shared.ollama import OllamaError, OllamaUnavailable
from shared.os_memory import memory_by_port, memory_of_ollama_runners, system_memory

log = logging.getLogger("model-serve.proxy")


async def _ollama_loaded(ctx: Context) -> dict[str, int] | None:
    """Ollama name → size of each model Ollama holds; None when Ollama is not there."""
    try:
        async with asyncio.timeout(3):
            return {m.get("name", ""): int(m.get("size", 0)) for m in await ctx.ollama.ps()}
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _ollama_entry(ctx: Context, name: str) -> Entry | None:
    return next((e for e in ctx.holder.catalog.entries.values() if e.ollama == name), None)


def _measure(ports: dict[str, int], blobs: dict[str, str]):
    return memory_by_port(ports), memory_of_ollama_runners(blobs) if blobs else {}


async def running_models(ctx: Context) -> tuple[list[dict], bool]:
    """Every loaded model on every backend. `memory.measured` is the model's own memory;
    `memory.reclaimable` the part of it the system's used figure leaves out (mapped weights),
    which the governor adds back."""
    catalog = ctx.holder.catalog
    try:
        async with asyncio.timeout(5):
            engine = await ctx.engine.running(ctx.session, catalog)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        engine = {}
    ollama_up = (ollama := await _ollama_loaded(ctx)) is not None
    ollama = ollama or {}
    ollama_entries = {name: _ollama_entry(ctx, name) for name in ollama}
    ports = {mid: r.port for mid, r in engine.items() if r.port}
    blobs = {name: os.path.realpath(e.path) for name, e in ollama_entries.items()
             if e and e.path}
    (by_port, by_file), footprints = await asyncio.gather(
        asyncio.to_thread(_measure, ports, blobs),
        asyncio.to_thread(Footprints, ctx.settings.footprints_file))
    now = time.time()
    out = []

    def row(mid: str, name: str, entry: Entry | None, backend: str, state: str,
            measured: int | None, reclaimable: int | None) -> None:
        use = ctx.usage.models.get(mid)
        busy = bool(use and use.in_flight)
        last = ctx.usage.touch(mid, only_if_unseen=True) if state == "loaded" else (
            use.last_used if use and use.last_used else None)
        ttl = entry.ttl if entry else None
        key = f"{backend}:{name}"
        estimated = (footprints.estimate(key, entry, backend) if entry else
                     footprints.learned(key, [backend, name]))
        out.append({
            "id": mid, "name": name, "backend": backend, "state": state,
            # a model in use is not idle: its TTL runs from its last request's end
            "last_used": last, "idle_seconds": (0.0 if busy else round(now - last, 1))
            if last else None,
            "in_flight": use.in_flight if use else 0,
            "requests": use.requests if use else 0,
            "ttl": ttl or None,
            "expires_at": (now if busy else last) + ttl if last and ttl else None,
            "memory": {"estimated": estimated, "measured": measured,
                       "reclaimable": reclaimable},
            "pinned": bool(entry and entry.pin),
            "context_length": entry.ctx_size if entry else None,
            "parallel": entry.parallel if entry else None,
            "queue": ctx.limits.stats(mid),
        })

    for mid, r in engine.items():
        mem = by_port.get(mid)
        row(mid, mid, catalog.entries.get(mid), "engine", r.state,
            mem.total if mem else None, mem.reclaimable if mem else None)
    for name, size in ollama.items():
        entry = ollama_entries[name]
        # Ollama's runner measured like our own processes when it can be read; otherwise
        # the size Ollama reports, all of it added to the system's figure.
        mem = by_file.get(name)
        row(entry.id if entry else name, name, entry, "ollama", "loaded",
            mem.total if mem else size, mem.reclaimable if mem else size)
    return out, ollama_up


async def running_state(ctx: Context) -> tuple[list[dict], bool, dict]:
    """Loaded models, whether Ollama answers, and the system's memory by the governor's
    accounting: /running, and /metrics' gauges."""
    (models, ollama_up), health = await asyncio.gather(
        running_models(ctx), governor_health(ctx.session, ctx.settings))
    governed = health and health.get("memory")
    if not governed:  # no governor, or none of its checks yet: the same sum, no signals
        reading = await asyncio.to_thread(system_memory)
        governed = account(reading, models, 0, ctx.settings.pressure_threshold).to_dict()
    return models, ollama_up, {**governed, "governor": "up" if health else "down"}


async def running(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    models, ollama_up, system = await running_state(ctx)
    return web.json_response({"models": models, "system": system,
                              "ollama": {"url": ctx.settings.ollama_base, "ok": ollama_up}})


async def scrape(request: web.Request) -> web.StreamResponse:
    """GET /metrics: the stack's Prometheus metrics; with ?model=, that model's own
    llama-server's (a per-model route)."""
    if "model" in request.query:
        return await forward(request)
    ctx = request.app[CTX]
    models, _, system = await running_state(ctx)
    return ctx.metrics.export(models, system,
                              {mid: ctx.limits.stats(mid) for mid in ctx.limits.lanes})


def _text(given: object) -> str:
    return given[:300] if isinstance(given, str) else ""


async def _requested(request: web.Request) -> tuple[Entry | None, str | None, dict] | \
        web.Response:
    """The model a management call names: its catalog entry and/or its Ollama name."""
    ctx = request.app[CTX]
    _, body, problem = await request_body.read(request)
    if problem:
        return problem
    name = body.get("model")
    if not isinstance(name, str) or not name:
        return error_response(400, 'expected a JSON body {"model": "<id>"}', "missing_model")
    entry = await find(ctx, name)
    ollama_name = entry.ollama if entry else await ctx.ollama_models.lookup(name)
    if entry is None and ollama_name is None:
        return not_found(ctx.holder.catalog, name)
    return entry, ollama_name, body


async def _holders(ctx: Context, entry: Entry | None, ollama_name: str | None) -> list[Key]:
    """The backends that hold the model now: an unload goes there, wherever the catalog
    would send its requests."""
    keys = []
    if entry:
        try:
            if entry.id in await ctx.engine.loaded(ctx.session, ctx.holder.catalog):
                keys.append(("engine", entry.id))
        except (aiohttp.ClientError, ValueError, EngineError):
            pass
    if ollama_name and ollama_name in (await _ollama_loaded(ctx) or {}):
        keys.append(("ollama", ollama_name))
    return keys


async def unload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, body = found
    mid = entry.id if entry else ollama_name
    # an unload asked for while the model loads (Unload right after Load) unloads it once it
    # is loaded: stopped halfway, the load would fail as if the engine had
    for key in (("engine", entry.id) if entry else None, ("ollama", ollama_name)):
        if key and key[1]:
            await ctx.admission.loading_done(key)
    keys = [k for k in await _holders(ctx, entry, ollama_name)
            if body.get("backend") in (None, k[0])]
    if not keys:
        return error_response(409, f"{mid} is not loaded", "model_not_loaded")
    # from the busy check on, nothing awaits until every holder is marked as unloading,
    # so no request can slip in between
    use = ctx.usage.models.get(mid)
    if use and use.in_flight and not body.get("force"):
        return error_response(409, f"{mid} is serving {use.in_flight} request(s); unload it "
                              "anyway with force (`model unload --force`)", "model_busy")
    async with contextlib.AsyncExitStack() as stack:
        for key in keys:
            await stack.enter_async_context(ctx.admission.unloading(key))
        try:
            for backend, name in keys:
                if backend == "ollama":
                    await ctx.ollama.unload(name)
                else:
                    await ctx.engine.unload(ctx.session, entry)
        except (OllamaUnavailable, OllamaError) as e:
            return error_response(503, str(e), "ollama_unavailable")
        except (EngineError, aiohttp.ClientError) as e:
            return error_response(503, f"engine: {e}", "engine_error")
    # the governor's unloads pass here too, with their cause; a client's are its own
    governor = hmac.compare_digest(request.headers.get(HEADER, ""), ctx.engine.key)
    reason = unload_reason(body.get("reason")) if governor else "manual"
    # the signals' names label a metric: only names
    signal = _text(body.get("signal")) if reason == "signal" else ""
    signal = signal if re.fullmatch(r"[a-z0-9_,-]*", signal) else ""
    for key in keys:
        ctx.metrics.unloaded(key, mid, reason, _text(body.get("detail")) if governor else "",
                             signal)
    if not governor:  # the governor logs its own, with the numbers
        log.info("unloaded %s from %s at a client's request%s", mid,
                 " and ".join(k[0] for k in keys), " (forced)" if use and use.in_flight else "")
    return web.json_response({"model": mid, "unloaded": True,
                              "backends": [k[0] for k in keys]})


async def load(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, _ = found
    backend = "ollama" if entry is None or entry.backend == "ollama" else "engine"
    key = (backend, ollama_name if backend == "ollama" else entry.id)
    async with ctx.admission.gate(key):
        refused = await ctx.admission.ensure(key, entry, entry.id if entry else ollama_name)
    if refused:
        return refused
    return web.json_response({"model": entry.id if entry else ollama_name, "loaded": True})


async def hold_engine(request: web.Request) -> web.StreamResponse:
    """POST /engine/hold (services/proxy/models/engine_hold.py): one JSON line once the requests
    under way are done (`in_flight`: how many still go on after DRAIN_SECONDS), then held
    until the caller closes the request."""
    ctx = request.app[CTX]
    if not hmac.compare_digest(request.headers.get(HEADER, ""), ctx.engine.key):
        return error_response(403, "only the stack's own sync holds the engine's requests",
                              "forbidden")
    admission, drain = ctx.admission, ctx.settings.drain_seconds
    log.info("engine config change: requests for the engine's models wait until it serves "
             "it; %d under way get up to %gs (DRAIN_SECONDS)", admission.hold.under_way, drain)
    async with admission.hold.held(drain) as left:
        if left:
            log.warning("engine config change: %d request(s) still under way after %gs "
                        "(DRAIN_SECONDS); the engine's restart cuts them", left, drain)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        try:
            await resp.write(json.dumps({"held": True, "in_flight": left}).encode() + b"\n")
            await asyncio.sleep(LONGEST_HOLD)  # cancelled when the caller closes the request
            log.warning("engine config change: the sync held requests for %gs; they go on",
                        LONGEST_HOLD)
        finally:
            # the models the engine's reload stopped are cold before anyone goes on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(admission.look(ctx.holder.catalog.entries), 5)
            log.info("engine config change: requests go on")
    return resp
