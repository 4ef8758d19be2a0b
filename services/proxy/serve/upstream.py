"""One way to a model: its own llama-server while it is warm, else the engine (the router,
which never loads a model on its own). A model found gone goes back to its owner."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from services.proxy.context import CTX
from services.proxy.serve.engine_errors import NotLoaded
from shared.catalog import Catalog, Entry
from shared.engines.base import EngineError
from shared.errors import error_response

log = logging.getLogger("model-serve.proxy")
# Headers that describe one hop, or that are ours (the API key), never sent on to a backend
# or a peer.
DROP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                  "authorization", "x-api-key", "accept-encoding", "upgrade", "te", "trailer",
                  "origin", "cookie"})
# how long an engine may take to notice that a model's server has ended
SETTLE_SECONDS = 5.0


async def post(ctx, entry: Entry, path: str, engine_url: str, streamed: bool = False,
               **kwargs) -> aiohttp.ClientResponse:
    return await send(ctx, "POST", entry, path, engine_url, streamed, **kwargs)


async def send(ctx, method: str, entry: Entry, path: str, engine_url: str,
               streamed: bool = False, **kwargs) -> aiohttp.ClientResponse:
    """The response (its headers read) from the model's own server, else from the engine.
    The caller releases it (`async with`)."""
    if streamed:
        # llama-server closes a connection once it has streamed an answer on it, without
        # saying so (its HTTP library takes a stream's end for a cancel), and the pool would
        # take it back at the stream's last byte: the next request (a queued one starts that
        # very moment) would go out on it and find it closed. Said, it is never reused.
        kwargs["headers"] = {**kwargs.get("headers", {}), "Connection": "close"}
    key = ("engine", entry.id)
    direct = ctx.owner.address(entry.id)
    if direct is None and ctx.engine.starts_on_request:
        # llama-swap starts any model it is sent a request for: one the owner has not
        # loaded (or whose server it has not found) goes back to the owner instead
        ctx.owner.lost(key)
        raise NotLoaded(error_response(503, f"{entry.id} is not loaded", "model_not_loaded"))
    if direct:
        try:
            return await ctx.session.request(method, direct + path, **kwargs)
        except aiohttp.ClientConnectorError:
            # the request never left: its server has gone since the last look (crashed,
            # unloaded), and the owner loads the model again for it. A connection that
            # breaks once the request is sent may have been served in part (a crash
            # mid-answer), and the client hears of it.
            if await _gone(ctx, entry, urlsplit(direct).port):
                ctx.owner.lost(key)
            else:
                # its process is still there but its port refuses (it is ending, or hung on
                # its way out): the owner stops it, and loads it again for this request
                log.warning("%s: its server refuses connections; restarting it", entry.id)
                await ctx.owner.unload(key, entry.id, "crash",
                                       "its server stopped accepting connections", force=True)
            raise NotLoaded(error_response(503, f"{entry.id}'s server is gone or refuses "
                                           "connections", "model_not_loaded")) from None
    return await ctx.session.request(method, engine_url, **kwargs)


def the_client_left(request: web.Request) -> bool:
    """Writing to a client that has gone raises ClientConnectionResetError, a
    ClientConnectionError like a broken connection to the model: the client's own transport
    tells them apart. The caller then ends the request as the client's leaving (499)."""
    return request.transport is None or request.transport.is_closing()


def failure(request: web.Request, entry: Entry, error: aiohttp.ClientError) -> web.Response:
    """The client's answer when no answer came: the engine is down, or the connection to the
    model's server broke before it answered."""
    if the_client_left(request):
        raise asyncio.CancelledError from None
    ctx = request.app[CTX]
    if isinstance(error, aiohttp.ClientConnectorError):
        return error_response(503, ctx.engine.unreachable(), "engine_unavailable")
    if isinstance(error, aiohttp.ServerTimeoutError):
        log.warning("%s sent nothing for %gs (READ_TIMEOUT): taken for hung", entry.id,
                    ctx.settings.read_timeout)
        return error_response(504, f"{entry.id} sent nothing for "
                              f"{ctx.settings.read_timeout:g}s (READ_TIMEOUT); it may be hung: "
                              "`model logs engine` says more", "model_timeout")
    log.warning("%s: no answer, the connection broke: %s: %s", entry.id,
                error.__class__.__name__, error)
    return error_response(502, f"the connection to {entry.id} broke before it answered; it "
                          "may have crashed: `model logs engine` says why", "engine_error")


async def _gone(ctx, entry: Entry, port: int | None) -> bool:
    """Whether the model's server on `port` has ended, as the engine sees it within
    SETTLE_SECONDS (an engine notices a server's end a moment after it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while loop.time() < deadline:
        try:
            running = await ctx.engine.running(ctx.session, Catalog(entries={entry.id: entry}))
        except (aiohttp.ClientError, ValueError, EngineError):
            return False  # the engine's own trouble: the client hears of the broken answer
        now = running.get(entry.id)
        if now is None or now.state != "loaded" or now.port != port:
            return True
        await asyncio.sleep(0.05)
    return False
