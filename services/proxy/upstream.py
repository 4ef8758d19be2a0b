"""One way to a model: its own llama-server while it is warm, else the engine."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from shared.catalog import Catalog, Entry
from shared.engines.base import EngineError

# the model's server went away since the last look (killed, crashed, unloaded): a kept-alive
# connection to it is reset, a new one refused. Nothing has reached the client yet, so the
# engine, which loads the model again, is asked instead. A timeout is not among them: a
# server that is slow is still the one doing the work.
_GONE = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)
# how long an engine may take to notice that a model's server has ended
SETTLE_SECONDS = 5.0


async def post(ctx, entry: Entry, path: str, engine_url: str,
               **kwargs) -> aiohttp.ClientResponse:
    """The response (its headers read) from the model's own server, else from the engine.
    The caller releases it (`async with`)."""
    direct = ctx.admission.direct.get(entry.id)
    if direct:
        try:
            return await ctx.session.post(direct + path, **kwargs)
        except _GONE:
            ctx.admission.direct.pop(entry.id, None)
            await _until_the_engine_sees_it_gone(ctx, entry, urlsplit(direct).port)
    return await ctx.session.post(engine_url, **kwargs)


async def _until_the_engine_sees_it_gone(ctx, entry: Entry, port: int | None) -> None:
    """An engine that has not yet seen the model's server end forwards to its closed port
    (the router answers 502): wait until it has, so that it loads the model again. A server
    that still takes connections only closed a kept-alive one: no wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while loop.time() < deadline and port and not await _accepts(port):
        try:
            running = await ctx.engine.running(ctx.session, Catalog(entries={entry.id: entry}))
        except (aiohttp.ClientError, ValueError, EngineError):
            return  # the engine's own answer says what is wrong
        now = running.get(entry.id)
        if now is None or now.state != "loaded" or now.port != port:
            return
        await asyncio.sleep(0.05)


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
