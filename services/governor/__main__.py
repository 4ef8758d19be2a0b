"""The governor process: memory accounting and pressure signals, TTL, LRU unloading, and
every load (admission first).

It keeps no state of its own but learned footprints: after a restart it picks up from the
proxy's /running. While it is down, the proxy loads models itself, without admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac

import aiohttp
from aiohttp import web

from services.governor.scheduler import Scheduler
from shared import logs, pressure_signals
from shared import settings as settings_mod
from shared.catalog_holder import CatalogHolder
from shared.engine_key import engine_key
from shared.engines import make_engine
from shared.ollama import Ollama
from shared.proxy_client import ProxyClient
from shared.settings import Settings

SCHEDULER = web.AppKey("scheduler", Scheduler)
AUTHORIZATION = web.AppKey("authorization", str)
BACKENDS = ("engine", "ollama")


async def load(request: web.Request) -> web.Response:
    """{"model", "backend"} → {"loaded": true} or {"loaded": false, "error": {...}}, once the
    load is done or refused. Only the proxy may ask: it sends the engine's key."""
    if not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                               request.app[AUTHORIZATION].encode()):
        return web.json_response({"error": "send the engine's key"}, status=401)
    try:
        body = await request.json()
        key = (body["backend"], body["model"])
        if key[0] not in BACKENDS or not isinstance(key[1], str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'expected {"model": "<name>", "backend": '
                                           '"engine" or "ollama"}'}, status=400)
    return web.json_response(await request.app[SCHEDULER].load(key))


async def health(request: web.Request) -> web.Response:
    s = request.app[SCHEDULER]
    return web.json_response({
        "status": "degraded" if s.problem else "ok", "problem": s.problem,
        "memory": s.memory, "admissions": s.admissions,
        "loading": [name for (_, name), ld in s.loads.items() if ld.done_at is None],
        "unloads": s.unloads[-50:]})


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[AUTHORIZATION] = f"Bearer {engine_key(settings)}"

    async def lifecycle(app: web.Application):
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as proxy_s,
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=10)) as backend_s):
            signals = pressure_signals.for_this_machine(
                settings.psi_level, settings.paging_mib_s, settings.mac_pressure_level)
            scheduler = Scheduler(settings, ProxyClient(settings.proxy_url, proxy_s,
                                                        settings.api_key, engine_key(settings)),
                                  CatalogHolder(settings), make_engine(settings),
                                  Ollama(settings.ollama_base, backend_s), backend_s, signals)
            await asyncio.to_thread(scheduler.holder.refresh)
            app[SCHEDULER] = scheduler
            task = asyncio.create_task(scheduler.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/load", load)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    logs.setup("governor")
    settings = settings_mod.load()
    web.run_app(make_app(settings), host="127.0.0.1", port=settings.governor_port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
