"""The management API: GET /running, POST /models/unload, POST /models/load, and the sync's
POST /engine/hold."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re

from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.http import request_body
from services.proxy.manage.governor_client import governor_health
from services.proxy.manage.metrics import unload_reason
from services.proxy.manage.rpc_workers import rpc_workers
from services.proxy.models.engine_hold import LONGEST_HOLD
from services.proxy.models.measure import accounting, running_models
from services.proxy.peers import listing
from services.proxy.serve.forward import find, forward, not_found
from shared.catalog import Entry
from shared.engine_key import HEADER
from shared.errors import error_response
from shared.proxy_client import HOLD_SAVE_SECONDS
from shared.room import others

log = logging.getLogger("model-serve.proxy")


async def running_state(ctx: Context) -> tuple[list[dict], bool, dict]:
    """Loaded models (and loads under way or waiting), whether Ollama answers, and the
    machine's memory by the owner's accounting, with the governor's pressure signals when it
    answers: /running, and /metrics' gauges."""
    (models, ollama_up), health = await asyncio.gather(
        running_models(ctx), governor_health(ctx.session, ctx.settings))
    acct = await accounting(ctx.settings, models, ctx.owner.reserved(models))
    signals = (health or {}).get("memory") or {}
    system = {**acct.to_dict(), "other_programs": others(acct, models),
              **{k: signals[k] for k in ("signals", "firing", "missing", "note")
                 if k in signals},
              "room": acct.room, "governor": "up" if health else "down"}
    listed = {(m["backend"], m["name"]) for m in models}
    changing = [{**w, "queue": ctx.limits.stats(w["id"])} for w in ctx.owner.waiting()
                if (w["backend"], w["name"]) not in listed]
    return models + changing, ollama_up, system


async def running(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    models, ollama_up, system = await running_state(ctx)
    contexts = await asyncio.to_thread(ctx.owner.contexts.state, ctx.holder.catalog)
    workers = await rpc_workers(ctx.holder.catalog, models)
    return web.json_response({"models": models, "system": system, "contexts": contexts,
                              "ollama": {"url": ctx.settings.ollama_base, "ok": ollama_up},
                              "peers": listing.running_rows(ctx), "rpc_workers": workers})


async def scrape(request: web.Request) -> web.StreamResponse:
    """GET /metrics: the stack's Prometheus metrics; with ?model=, that model's own
    llama-server's (a per-model route)."""
    if "model" in request.query:
        return await forward(request)
    ctx = request.app[CTX]
    models, _, system = await running_state(ctx)
    return ctx.metrics.export(models, system,
                              {mid: ctx.limits.stats(mid) for mid in ctx.limits.lanes},
                              listing.running_rows(ctx),
                              await rpc_workers(ctx.holder.catalog, models))


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


async def unload(request: web.Request) -> web.Response:
    """A client's unload (`manual`), or the governor's with its cause (it sends the stack's
    key) and `idle_at_least`: the seconds of idleness its decision relied on."""
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, body = found
    mid = entry.id if entry else ollama_name
    governor = hmac.compare_digest(request.headers.get(HEADER, ""), ctx.engine.key)
    reason = unload_reason(body.get("reason")) if governor else "manual"
    # the signals' names label a metric: only names
    signal = _text(body.get("signal")) if reason == "signal" else ""
    signal = signal if re.fullmatch(r"[a-z0-9_,-]*", signal) else ""
    idle = body.get("idle_at_least") if governor else None
    idle = float(idle) if isinstance(idle, int | float) and not isinstance(idle, bool) else None
    keys = [k for k in (("engine", entry.id) if entry else None, ("ollama", ollama_name))
            if k and k[1] and body.get("backend") in (None, k[0])]
    # a model loading (Unload right after Load) is unloaded once it is loaded
    held = [k for k in keys if ctx.owner.holds(k)]
    if not held:  # perhaps loaded before this process started: look once
        await ctx.owner.look(ollama=any(k[0] == "ollama" for k in keys))
        held = [k for k in keys if ctx.owner.warm(k)]
    if not held:
        return error_response(409, f"{mid} is not loaded", "model_not_loaded")
    forced = bool(body.get("force"))
    for key in held:
        if error := await ctx.owner.unload(key, mid, reason, _text(body.get("detail"))
                                           if governor else "", signal, forced, idle):
            return error.response()
    return web.json_response({"model": mid, "unloaded": True,
                              "backends": [k[0] for k in held]})


async def load(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    found = await _requested(request)
    if isinstance(found, web.Response):
        return found
    entry, ollama_name, _ = found
    backend = "ollama" if entry is None or entry.backend == "ollama" else "engine"
    key = (backend, ollama_name if backend == "ollama" else entry.id)
    async with ctx.owner.gate(key):
        refused = await ctx.owner.ensure(key, entry, entry.id if entry else ollama_name)
    if refused:
        return refused.response()
    return web.json_response({"model": entry.id if entry else ollama_name, "loaded": True})


async def hold_engine(request: web.Request) -> web.StreamResponse:
    """POST /engine/hold[?why=stop] (services/proxy/models/engine_hold.py): one JSON line once
    the requests under way are done (`in_flight`: how many still go on after DRAIN_SECONDS)
    and the models' contexts are saved, then held until the caller closes the request."""
    ctx = request.app[CTX]
    if not hmac.compare_digest(request.headers.get(HEADER, ""), ctx.engine.key):
        return error_response(403, "only the stack's own sync holds the engine's requests",
                              "forbidden")
    owner, drain = ctx.owner, ctx.settings.drain_seconds
    # the engine service stopping (a restart of it), or a config llama-swap reloads
    stopping = request.query.get("why") == "stop"
    what = "engine stop" if stopping else "engine config change"
    log.info("%s: requests for the engine's models wait until it is done; %d under way get "
             "up to %gs (DRAIN_SECONDS)", what, owner.hold.under_way, drain)
    async with owner.hold.held(drain, stopping) as left:
        if left:
            log.warning("%s: %d request(s) still under way after %gs (DRAIN_SECONDS); the "
                        "engine's restart cuts them", what, left, drain)
        # the engine stops every model: their conversations go on after it
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HOLD_SAVE_SECONDS):
                await owner.keep_contexts()
        if stopping:
            owner.engine_stopping()
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        try:
            await resp.write(json.dumps({"held": True, "in_flight": left}).encode() + b"\n")
            await asyncio.sleep(LONGEST_HOLD)  # cancelled when the caller closes the request
            log.warning("%s: requests were held for %gs; they go on", what, LONGEST_HOLD)
        finally:
            # the models the engine's reload stopped are cold before anyone goes on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(owner.look(), 5)
            log.info("%s: requests go on", what)
    return resp
