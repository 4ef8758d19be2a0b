"""A request's turn with its model, the same on every route: counted as a use (the governor
never unloads a model in use), held while the engine takes up a config that stops its models
(engine_hold.py), loaded through admission, queued behind the model's `max_concurrent`
answers, and loaded again, once, when its process ended unnoticed."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.manage import metrics
from services.proxy.models.limits import QueueFull
from services.proxy.models.stalled_readers import watched
from services.proxy.serve.engine_errors import NotLoaded
from shared.catalog import Entry
from shared.errors import error_response
from shared.loading import Key

log = logging.getLogger("model-serve.proxy")
Answer = Callable[[float], Awaitable[web.StreamResponse]]  # seconds spent loading → answer


async def with_model(request: web.Request, key: Key, entry: Entry | None, use_id: str,
                     answer: Answer) -> web.StreamResponse:
    ctx = request.app[CTX]
    ctx.usage.start(use_id)
    if turn := metrics.turn():  # from here on the request counts as this model's
        turn.model, turn.backend = use_id, key[0]
    in_flight = ctx.metrics.series(use_id, key[0]).in_flight
    in_flight.inc()
    try:
        async with ctx.owner.gate(key):
            try:
                return await _attempt(request, key, entry, use_id, answer)
            except NotLoaded:
                log.info("%s had left the engine; loading it again", key[1])
                ctx.owner.lost(key)
            try:
                return await _attempt(request, key, entry, use_id, answer)
            except NotLoaded as e:
                return e.response
    finally:
        ctx.usage.finish(use_id)
        in_flight.dec()


async def _attempt(request: web.Request, key: Key, entry: Entry | None, use_id: str,
                   answer: Answer) -> web.StreamResponse:
    ctx = request.app[CTX]
    start = time.monotonic()
    if refused := await ctx.owner.ensure(key, entry, use_id):
        return refused.response()
    loaded = time.monotonic()
    loading = loaded - start
    timeout = entry.write_timeout if entry and entry.write_timeout else \
        ctx.settings.write_timeout
    try:
        async with _turn(ctx, key, entry):
            with watched(request, use_id, timeout):
                if turn := metrics.turn():  # TTFT's parts; a reload after NotLoaded adds up
                    turn.loading += loading
                    turn.sent = time.monotonic()
                    turn.queued += turn.sent - loaded
                return await answer(loading)
    except QueueFull as e:
        return _busy(ctx, key[1], entry, e)


def _turn(ctx: Context, key: Key, entry: Entry | None):
    """Ollama queues its own models (OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE)."""
    if key[0] != "engine" or entry is None:
        return contextlib.nullcontext()
    return ctx.limits.slot(entry.id, entry.at_once)


def _busy(ctx: Context, model: str, entry: Entry | None, full: QueueFull) -> web.Response:
    limit = entry.at_once if entry else 1
    resp = error_response(503, f"{model} is answering {limit} request(s) at once "
                          f"(max_concurrent) and {full.waiting} more are waiting (MAX_QUEUE="
                          f"{ctx.settings.max_queue}); retry in {full.retry_after} s",
                          "model_busy")
    resp.headers["Retry-After"] = str(full.retry_after)
    return resp
