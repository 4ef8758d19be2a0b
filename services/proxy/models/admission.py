"""Before a cold model's first request: the governor loads it (admission first) and the
request waits; when the governor does not answer, the proxy loads it itself and /health says
so. One load per model however many requests wait for it, and each waiter gets its own
answer. Warm models skip all of this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web

from services.proxy.manage.governor_client import governor_health
from services.proxy.manage.metrics import Metrics
from services.proxy.models.engine_hold import Hold
from services.proxy.models.usage import Usage
from shared import loading
from shared.catalog import Catalog, Entry
from shared.engines import Engine, EngineError
from shared.loading import Key, LoadError
from shared.ollama import Ollama, OllamaError, OllamaUnavailable
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")
# Loading a large model from a slow disk can take minutes; the governor answers when done.
LOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=2)
GOVERNOR_CHECK = 5.0  # seconds between checks that the governor we wait for still answers


class Admission:
    def __init__(self, settings: Settings, engine: Engine, session: aiohttp.ClientSession,
                 ollama: Ollama, usage: Usage, metrics: Metrics) -> None:
        self.settings, self.engine, self.session, self.ollama = settings, engine, session, ollama
        self.usage, self.metrics = usage, metrics
        self.warm: set[Key] = set()
        # catalog id → the address of the model's own llama-server: warm requests go there,
        # past the engine (one hop, kept-alive connections)
        self.direct: dict[str, str] = {}
        self._pending: dict[Key, asyncio.Task[LoadError | None]] = {}
        self._unloading: dict[Key, asyncio.Event] = {}
        # let go of by the proxy (an unload, a request that found it gone): its leaving is
        # counted there, not as a crash, and it is not warm again until the proxy loads it
        self._forgotten: set[Key] = set()
        self._said_down = False
        # closed while the engine takes up a config that stops every model it runs
        self.hold = Hold()
        self._looking = asyncio.Lock()  # one look at the backends at a time

    async def ensure(self, key: Key, entry: Entry | None, use_id: str) -> web.Response | None:
        """None once the model is loaded; otherwise this client's own error response."""
        if key in self.warm:
            return None
        if key in self._unloading:  # being unloaded: load it again once it is gone
            await self._unloading[key].wait()
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, entry, use_id))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # shielded: a client that gives up does not cancel the load others wait for
        error = await asyncio.shield(task)
        return None if error is None else error.response()

    async def loading_done(self, key: Key) -> None:
        """Returns once a load of the model in progress here has ended, however it ended."""
        if task := self._pending.get(key):
            await asyncio.shield(task)

    def gate(self, key: Key) -> contextlib.AbstractAsyncContextManager:
        """Around all a request does with its model: an engine model's wait while the engine
        takes up a new config (engine_hold.py); Ollama's models never wait."""
        return self.hold.passage() if key[0] == "engine" else contextlib.nullcontext()

    def forget(self, key: Key) -> None:
        self.warm.discard(key)
        self._forgotten.add(key)
        self.direct.pop(key[1], None)

    @contextlib.asynccontextmanager
    async def unloading(self, key: Key):
        """While a model is being unloaded, requests for it wait, then load it again."""
        self.forget(key)
        done = self._unloading.setdefault(key, asyncio.Event())
        try:
            yield
        finally:
            self._unloading.pop(key, None)
            done.set()

    async def _load(self, key: Key, entry: Entry | None, use_id: str) -> LoadError | None:
        start, by = time.monotonic(), "governor"
        self.metrics.loading(key, use_id)
        try:
            if not (self.settings.memory_admission and await self._by_governor(key)):
                by = "proxy"
                await loading.load(key, entry, self.engine, self.ollama, self.session)
                log.info("loaded %s on %s without admission", key[1], key[0])
        except LoadError as e:
            self.metrics.load_failed(key, use_id, e)
            return e
        self.metrics.loaded(key, use_id, by, time.monotonic() - start)
        self.warm.add(key)
        self._forgotten.discard(key)
        self.usage.touch(use_id)
        if key[0] == "engine":  # its address now, not at the next look
            with contextlib.suppress(aiohttp.ClientError, ValueError, EngineError):
                await self._look_at_engine({entry.id: entry})
        return None

    async def _look_at_engine(self, entries: dict[str, Entry]) -> set[Key]:
        """The engine's loaded models, and the address of each one's own server."""
        running = await self.engine.running(self.session, Catalog(entries=entries or {}))
        self.direct.update({mid: f"http://127.0.0.1:{r.port}" for mid, r in running.items()
                            if r.state == "loaded" and r.port})
        return {("engine", m) for m, r in running.items() if r.state == "loaded"}

    async def _by_governor(self, key: Key) -> bool:
        """True when the governor loaded the model; LoadError when it refused or the load
        failed; False when it does not answer (the caller loads it then). A load may take
        minutes, so there is no deadline; a governor that stops answering its /health while
        we wait (hung, or stopped) is given up on."""
        ask = asyncio.ensure_future(self._ask_governor(key))
        try:
            while not (await asyncio.wait({ask}, timeout=GOVERNOR_CHECK))[0]:
                if await governor_health(self.session, self.settings, 2.0) is None:
                    raise TimeoutError("it stopped answering")
            verdict = ask.result()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            ask.cancel()
            if not self._said_down:
                log.warning("governor not answering (%s); loading models without admission "
                            "until it is back", str(e) or e.__class__.__name__)
            self._said_down = True
            return False
        self._said_down = False
        if not verdict.get("loaded"):
            raise LoadError.from_dict(verdict.get("error") or {})
        return True

    async def _ask_governor(self, key: Key) -> dict:
        async with self.session.post(self.settings.governor_url + "/load",
                                     json={"backend": key[0], "model": key[1]},
                                     headers=self.engine.headers, timeout=LOAD_TIMEOUT) as r:
            return await r.json()

    async def follow(self, holder, interval: float = 1.0) -> None:
        """Keep `warm` true to the backends: a model can also leave when its process ends,
        and Ollama unloads its models after their keep_alive."""
        while True:
            await asyncio.sleep(interval)
            await self.look(holder.catalog.entries)

    async def look(self, entries: dict[str, Entry]) -> None:
        """What the backends hold now becomes `warm` (and each engine model's address)."""
        async with self._looking:
            before, seen = set(self.warm), set()
            try:
                warm = await self._look_at_engine(entries)
                seen.add("engine")
            except (aiohttp.ClientError, ValueError, EngineError):
                warm = set()
            if any(b == "ollama" for b, _ in self.warm):  # ask Ollama only when it serves us
                with contextlib.suppress(OllamaUnavailable, OllamaError, ValueError):
                    warm |= {("ollama", m.get("name", "")) for m in await self.ollama.ps()}
                    seen.add("ollama")
            self._count_exits(before & self.warm - warm, seen, entries)
            self._forgotten &= warm
            # one the proxy let go of (an unload, perhaps while this look was under way) is
            # warm again only once the proxy loads it: a backend lists a model a moment
            # longer while its process ends
            self.warm = warm - self._forgotten
            self.direct = {m: url for m, url in self.direct.items()
                           if ("engine", m) in self.warm}

    def _count_exits(self, gone: set[Key], seen: set[str], entries: dict[str, Entry]) -> None:
        """Models that left a backend which answered, without the proxy unloading them: an
        engine model's process ended (or the engine stopped it to take up a new config);
        Ollama let one go (its keep_alive)."""
        for backend, name in gone - self._forgotten:
            if backend == "engine" and "engine" in seen:
                self.metrics.unloaded((backend, name), name, *(
                    ("engine-reload", "the engine stopped it to take up its new config")
                    if self.hold.holding else
                    ("crash", "its process ended without being asked to")))
            elif backend == "ollama" and "ollama" in seen:
                # counted by the catalog id its requests are counted by, as with_model does
                mid = next((m for m, e in entries.items() if e.ollama == name), name)
                self.metrics.unloaded((backend, name), mid, "expired", "Ollama's keep_alive")
