"""The governor process: memory pressure watch, LRU unloading, admission decisions.

It keeps no state of its own but learned footprints: after a restart it picks up from the
proxy's /running. While it is down, serving goes on without admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import web

from services.governor.scheduler import Scheduler
from shared import settings as settings_mod
from shared.catalog_holder import CatalogHolder
from shared.proxy_client import ProxyClient
from shared.settings import Settings

SCHEDULER = web.AppKey("scheduler", Scheduler)


async def admit(request: web.Request) -> web.Response:
    try:
        model = (await request.json())["model"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'expected {"model": "<id>"}'}, status=400)
    return web.json_response(await request.app[SCHEDULER].admit(model))


async def health(request: web.Request) -> web.Response:
    s = request.app[SCHEDULER]
    r = s.last_reading
    return web.json_response({
        "status": "ok",
        "memory": None if r is None else {"total": r.total, "available": r.available,
                                          "used_pct": round(r.used_pct, 1)},
        "threshold_pct": s.settings.pressure_threshold, "admissions": s.admissions,
        "unloads": s.unloads[-50:]})


def make_app(settings: Settings) -> web.Application:
    app = web.Application()

    async def lifecycle(app: web.Application):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            proxy = ProxyClient(settings.proxy_url, session, settings.api_key)
            scheduler = Scheduler(settings, proxy, CatalogHolder(settings))
            app[SCHEDULER] = scheduler
            task = asyncio.create_task(scheduler.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/admit", admit)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="governor: %(message)s")
    settings = settings_mod.load()
    web.run_app(make_app(settings), host="127.0.0.1", port=settings.governor_port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
