"""The governor process: the policy that watches the machine (TTL, memory pressure, the OS's
pressure signals) and asks the proxy, which owns each model's life, to unload idle models.

It keeps no state of its own: after a restart it picks up from the proxy's /running. While
it is down, models load and serve as before (the proxy admits them); only the TTL and
pressure unloads wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web

from services.governor.policy import Policy
from shared import logs, pressure_signals
from shared import settings as settings_mod
from shared.engine_key import engine_key
from shared.proxy_client import ProxyClient
from shared.settings import Settings

POLICY = web.AppKey("policy", Policy)


async def health(request: web.Request) -> web.Response:
    p = request.app[POLICY]
    return web.json_response({"status": "degraded" if p.problem else "ok",
                              "problem": p.problem, "memory": p.memory,
                              "unloads": p.unloads[-50:]})


def make_app(settings: Settings) -> web.Application:
    app = web.Application()

    async def lifecycle(app: web.Application):
        # an unload returns once the model has left: up to the owner's 30 s, and its drain
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            signals = pressure_signals.for_this_machine(
                settings.psi_level, settings.paging_mib_s, settings.mac_pressure_level)
            policy = Policy(settings, ProxyClient(settings.proxy_url, session,
                                                  settings.api_key, engine_key(settings)),
                            signals)
            app[POLICY] = policy
            task = asyncio.create_task(policy.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    logs.setup("governor")
    settings = settings_mod.load()
    web.run_app(make_app(settings), host="127.0.0.1", port=settings.governor_port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
