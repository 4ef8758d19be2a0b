"""A load that meets the router while it starts (a restart under way) is a 503 the clients
retry, not a 500. The real router answers so only for the moment before it serves (the
killed-engine test in test_runner.py meets it now and then), so a server answers here as it
did there, word for word."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from shared.catalog import Entry
from shared.engines.router import Router
from shared.loading import LoadError, load
from shared.ollama import Ollama
from shared.settings import load as load_settings
from tests.harness import free_port

STARTING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}


async def _starting(_: web.Request) -> web.Response:
    return web.json_response(STARTING, status=503)


async def _attempt(tmp_path: Path) -> LoadError:
    app = web.Application()
    app.router.add_post("/models/load", _starting)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = load_settings({"STATE_DIR": str(tmp_path / "state"),
                              "LLAMA_SWAP_PORT": str(port)}, env_file=tmp_path / "no")
    engine = Router(settings)
    entry = Entry(id="ms/tiny:0.2m-f32", path=str(tmp_path / "tiny.gguf"))
    try:
        async with aiohttp.ClientSession() as session:
            await load(("engine", entry.id), entry, engine, Ollama(settings, session), session)
    except LoadError as e:
        return e
    finally:
        await runner.cleanup()
    raise AssertionError("the load did not fail")


def test_a_router_still_starting_is_engine_unavailable(tmp_path: Path) -> None:
    error = asyncio.run(_attempt(tmp_path))
    assert (error.status, error.code) == (503, "engine_unavailable"), error.to_dict()
    assert "restarting" in error.message
