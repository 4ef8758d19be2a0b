"""Before a cold load: ask the governor for room, then load the model once, however many
requests for it arrive together. Warm models skip all of this."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import web

from services.proxy.ollama_chat import keep_alive
from shared.catalog import Entry
from shared.engines import Engine, EngineError
from shared.errors import error_response
from shared.ollama import Ollama, OllamaError, OllamaUnavailable
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")


class Admission:
    def __init__(self, settings: Settings, engine: Engine, session: aiohttp.ClientSession,
                 ollama: Ollama) -> None:
        self.settings, self.engine, self.session, self.ollama = settings, engine, session, ollama
        self.warm: set[str] = set()
        self._pending: dict[str, asyncio.Task] = {}

    def forget(self, model_id: str) -> None:
        self.warm.discard(model_id)

    async def ensure(self, entry: Entry) -> web.Response | None:
        """None when the model is loaded (or loading was left to the engine); otherwise
        the error response for the client."""
        if entry.id in self.warm:
            return None
        task = self._pending.get(entry.id)
        if task is None:
            task = asyncio.create_task(self._admit_and_load(entry))
            self._pending[entry.id] = task
            task.add_done_callback(lambda _: self._pending.pop(entry.id, None))
        # shielded: a client that gives up does not cancel the load others wait for
        return await asyncio.shield(task)

    async def _admit_and_load(self, entry: Entry) -> web.Response | None:
        if self.settings.memory_admission:
            refused = await self._ask_governor(entry)
            if refused:
                return refused
        try:
            if entry.backend == "ollama":
                await self.ollama.call("POST", "/api/generate",
                                       {"model": entry.ollama, "keep_alive": keep_alive(entry)})
            else:
                await self.engine.load(self.session, entry)
        except (OllamaUnavailable, OllamaError):
            return None  # the request itself reports Ollama's state
        except aiohttp.ClientConnectorError:
            return None  # likewise for the engine: 503 with what to do
        except EngineError as e:
            hint = f" (model file: {entry.path}; the engine log has the details)"
            return error_response(500, f"engine: {e}{hint}", "engine_error")
        self.warm.add(entry.id)
        return None

    async def _ask_governor(self, entry: Entry) -> web.Response | None:
        try:
            async with self.session.post(self.settings.governor_url + "/admit",
                                         json={"model": entry.id},
                                         timeout=aiohttp.ClientTimeout(total=120)) as r:
                verdict = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("governor not answering (%s); loading %s without admission",
                        e.__class__.__name__, entry.id)
            return None
        if verdict.get("admitted"):
            return None
        return error_response(503, verdict.get("message", "not enough memory"),
                              "insufficient_memory", **{k: verdict.get(k) for k in
                                                        ("needed", "available", "busy")})

    async def follow(self, holder, interval: float = 1.0) -> None:
        """Keep `warm` true to the backends, which also unload on their own (TTL)."""
        while True:
            await asyncio.sleep(interval)
            catalog = holder.catalog
            try:
                loaded = await self.engine.loaded(self.session, catalog)
            except (aiohttp.ClientError, ValueError, EngineError):
                loaded = {}
            by_ollama = [e for e in catalog.entries.values() if e.backend == "ollama"]
            in_ollama: set[str] = set()
            if by_ollama:  # no need to ask Ollama about models it does not serve
                with contextlib.suppress(OllamaUnavailable, OllamaError, ValueError):
                    in_ollama = {m.get("name") for m in await self.ollama.ps()}
            self.warm = {m for m, state in loaded.items() if state == "loaded"} | {
                e.id for e in by_ollama if e.ollama in in_ollama}
