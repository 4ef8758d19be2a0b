"""Each model's life, owned in one place beside the request counts, as Ollama's scheduler
(server/sched.go) sits beside its reference counts: one state machine per model, and one
loop that decides every load that needs memory, so two decisions never race over it.

    cold ─► queued ─► loading ─► warm (its own server's address) ─► draining ─► unloading ─► cold
                         └─► failed (the next request tries again)

A request awaits the owner (`ensure`) and never polls. A load that does not fit waits in the
queue, first come first served, while idle models leave for it (least recently used first,
after MIN_MODEL_AGE_SECONDS); it is refused only when it could never fit with every unpinned
model gone, or after LOAD_WAIT seconds, with the numbers. The governor's policy (TTL, memory
pressure, OS signals) reads the same state through /running and asks for unloads
(`unload`); serving goes on without it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import aiohttp

from services.proxy.manage.metrics import Metrics
from services.proxy.models.context_cache import ContextCache
from services.proxy.models.engine_hold import Hold
from services.proxy.models.measure import accounting
from services.proxy.models.usage import Usage
from shared import loading, room
from shared.catalog import Catalog, Entry
from shared.catalog_holder import CatalogHolder
from shared.engines import Engine, EngineError
from shared.loading import Key, LoadError
from shared.memory import Accounting, Footprints, shape
from shared.ollama import Ollama, OllamaError, OllamaUnavailable
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")

COLD, QUEUED, LOADING, WARM, DRAINING, UNLOADING, FAILED = (
    "cold", "queued", "loading", "warm", "draining", "unloading", "failed")
LOAD_TIMEOUT = 900.0  # a load of a large model from a slow disk; past it, the load failed
UNLOAD_TIMEOUT = 30.0  # an unload until the backend no longer lists the model
SETTLE = 3.0  # seconds after a load before its footprint is measured (warm-up done)
RECHECK = 1.0  # seconds between looks at the room while a load waits for it


@dataclass
class Life:
    key: Key
    model: str  # the catalog id (or Ollama's name) its requests are counted by
    state: str = COLD
    entry: Entry | None = None  # as loaded: when the catalog's differs, a restart is the config's
    address: str | None = None  # of its own llama-server while warm
    need: int = 0  # reserved while it loads and until its footprint is measured
    queued_at: float = 0.0
    loaded_at: float = 0.0
    load_seconds: float | None = None  # its last load's
    left_at: float = 0.0
    waiting_for: str = ""
    outcome: asyncio.Future | None = None  # the load's: None, or the LoadError its waiters get
    # set while the model is not leaving: requests that find it leaving wait for this
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.settled.set()


class Owner:
    def __init__(self, settings: Settings, engine: Engine, session: aiohttp.ClientSession,
                 ollama: Ollama, usage: Usage, metrics: Metrics, holder: CatalogHolder) -> None:
        self.settings, self.engine, self.session, self.ollama = settings, engine, session, ollama
        self.usage, self.metrics, self.holder = usage, metrics, holder
        self.lives: dict[Key, Life] = {}
        self.queue: list[Life] = []  # loads waiting for room, first come first served
        self.hold = Hold()  # closed while the engine takes up a config that stops its models
        self.footprints = Footprints(settings.footprints_file)
        self.contexts = ContextCache(settings, session, metrics, engine.headers)
        self.memory: Accounting | None = None  # the last accounting a decision used
        self.problem: str | None = None  # the last failure to decide, until one succeeds
        # the backends' rows with memory (measure.running_models), wired in by the app
        self.measure: Callable[[], Awaitable[list[dict]]] | None = None
        self._wake = asyncio.Event()
        self._tidied: Catalog | None = None  # the catalog the saved contexts were checked on
        self._tasks: set[asyncio.Task] = set()
        usage.on_idle = self.wake

    # ---- what the request path asks -------------------------------------------------------

    def life(self, key: Key, model: str) -> Life:
        if key not in self.lives:
            self.lives[key] = Life(key, model)
        return self.lives[key]

    def address(self, model_id: str) -> str | None:
        life = self.lives.get(("engine", model_id))
        return life.address if life and life.state == WARM else None

    def warm(self, key: Key) -> bool:
        life = self.lives.get(key)
        return bool(life and life.state == WARM)

    def holds(self, key: Key) -> bool:
        """Whether the model is loaded, loading or waiting to load."""
        life = self.lives.get(key)
        return bool(life and life.state not in (COLD, FAILED))

    def state(self, key: Key) -> str | None:
        life = self.lives.get(key)
        return life.state if life else None

    def waiting(self) -> list[dict]:
        """/running's rows for the models in a change the backends do not show yet: loads
        waiting for room (what each needs, and for what it waits), loads under way, and
        unloads until the model has left."""
        now = time.monotonic()
        shown = {QUEUED: QUEUED, LOADING: LOADING, DRAINING: "unloading", UNLOADING: "unloading"}
        return [{"id": lf.model, "name": lf.key[1], "backend": lf.key[0],
                 "state": shown[lf.state],
                 "waiting_seconds": round(now - lf.queued_at, 1) if lf.state == QUEUED
                 else None, "waiting_for": lf.waiting_for or None,
                 "in_flight": self.busy(lf.model), "requests": 0, "pinned": False,
                 "last_used": None, "idle_seconds": None, "ttl": None, "expires_at": None,
                 "memory": {"estimated": lf.need, "measured": None, "reclaimable": None},
                 "context_length": lf.entry.ctx_size if lf.entry else None,
                 "parallel": lf.entry.parallel if lf.entry else None}
                for lf in self.lives.values() if lf.state in shown]

    async def starts_now(self, key: Key, entry: Entry | None) -> bool:
        """Whether a request for the model would be served without waiting for room: it is
        warm or loading, or it is cold, nothing is queued ahead, and its estimate fits in the
        room now. Changes nothing (peers ask it to choose where a request goes)."""
        life = self.lives.get(key)
        if life and life.state in (WARM, LOADING):
            return True
        if life and life.state in (QUEUED, DRAINING, UNLOADING):
            return False
        if not self.settings.memory_admission or self.measure is None:
            return True
        if self.queue:
            return False
        rows = await self.measure()
        return self.estimate(key, entry) <= (await self._account(rows)).room

    async def ensure(self, key: Key, entry: Entry | None, use_id: str) -> LoadError | None:
        """None once the model is warm; otherwise the error this client gets. Bounded: a
        model leaving is waited for up to UNLOAD_TIMEOUT, a queued load up to LOAD_WAIT, a
        load up to LOAD_TIMEOUT."""
        life = self.life(key, use_id)
        for _ in range(3):  # a model can leave again between a load and this request's turn
            if life.state == WARM:
                return None
            if life.state in (DRAINING, UNLOADING):
                try:
                    async with asyncio.timeout(UNLOAD_TIMEOUT):
                        await life.settled.wait()
                except TimeoutError:
                    return LoadError(503, f"{key[1]} is still being unloaded after "
                                     f"{UNLOAD_TIMEOUT:g}s; try again shortly", "model_unloading")
                continue
            if life.state in (COLD, FAILED):
                # estimated on the catalog the engine will load it with: a sync may have
                # changed the model a moment ago
                if key[0] == "engine":
                    await asyncio.to_thread(self.holder.refresh)
                    entry = self.holder.catalog.entries.get(key[1], entry)
                if life.state in (COLD, FAILED):
                    self._enqueue(life, entry)
            # shielded: a client that gives up does not cancel what others wait for
            if error := await asyncio.shield(life.outcome):
                return error
        return None if life.state == WARM else LoadError(
            503, f"{key[1]} kept leaving as it loaded; try again", "model_unloading")

    def _enqueue(self, life: Life, entry: Entry | None) -> None:
        life.entry, life.state = entry, QUEUED
        life.queued_at, life.waiting_for = time.monotonic(), "its turn to be judged"
        life.outcome = asyncio.get_running_loop().create_future()
        life.need = 0 if life.key[0] == "ollama" and entry is None else \
            self.estimate(life.key, entry)
        if not self.settings.memory_admission:
            self._start(life)
            return
        self.queue.append(life)
        self.wake()

    def estimate(self, key: Key, entry: Entry | None) -> int:
        """What the model may take once loaded (a peer's room is measured against it too)."""
        if entry is None:  # one of Ollama's own: what it took last time, else nothing known
            return self.footprints.learned(":".join(key), list(key)) or 0
        return self.footprints.estimate(":".join(key), entry, key[0])

    def wake(self) -> None:
        self._wake.set()

    def gate(self, key: Key) -> contextlib.AbstractAsyncContextManager:
        """Around all a request does with its model: an engine model's wait while the engine
        takes up a new config (engine_hold.py); Ollama's models never wait."""
        return self.hold.passage() if key[0] == "engine" else contextlib.nullcontext()

    # ---- the loop that decides loads ------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK):
                    await self._wake.wait()
            self._wake.clear()
            if not self.queue:
                continue
            try:
                await self._decide()
                self.problem = None
            except Exception as e:  # noqa: BLE001 - no failure may end the loop
                problem = f"{e.__class__.__name__}: {e}"
                if problem != self.problem:
                    log.warning("cannot decide on loads now (%s); will try again", problem,
                                exc_info=not isinstance(e, aiohttp.ClientError))
                self.problem = problem

    async def _decide(self) -> None:
        rows = await self.measure()
        acct = await self._account(rows)
        self.memory = acct
        while self.queue:
            life = self.queue[0]
            if life.state != QUEUED:  # let go of meanwhile
                self.queue.pop(0)
                continue
            if life.need <= acct.room:
                self.queue.pop(0)
                log.info("loading %s on %s: needs about %s, %s free under the limit",
                         life.key[1], life.key[0], room.size(life.need), room.size(acct.room))
                self._start(life)
                acct = replace(acct, reserved=acct.reserved + life.need)
                continue
            waited = time.monotonic() - life.queued_at
            if room.never_fits(life.need, acct, rows):
                self._refuse(life, room.refusal(
                    life.key[1], life.need, acct, rows, "it does not fit even with every "
                    "unpinned model unloaded: raise MEMORY_PRESSURE_THRESHOLD, unpin a model, "
                    "or use a smaller quantisation or ctx_size"))
                continue
            if waited > self.settings.load_wait:
                self._refuse(life, room.refusal(
                    life.key[1], life.need, acct, rows, f"it waited {waited:.0f}s "
                    f"(LOAD_WAIT={self.settings.load_wait:g}) for room; held by "
                    f"{room.holding(rows, self.settings.min_model_age)}; try again once "
                    "they are done, or raise LOAD_WAIT or MEMORY_PRESSURE_THRESHOLD"))
                continue
            self._make_room(life, acct, rows)
            return  # first come, first served: later loads wait behind this one

    def _make_room(self, life: Life, acct: Accounting, rows: list[dict]) -> None:
        leaving = {lf.key[1] for lf in self.lives.values() if lf.state in (DRAINING, UNLOADING)}
        short = life.need - acct.room - sum(room.held(r) for r in rows if r["id"] in leaving)
        for victim in room.idle_lru(rows, self.settings.min_model_age, leaving):
            if short <= 0:
                break
            key = (victim["backend"], victim["name"])
            if key == life.key:
                continue
            why = (f"making room for {life.key[1]} (needs {room.size(life.need)}, "
                   f"{room.size(max(acct.room, 0))} free)")
            if self._leave(key, victim["id"], "admission", why):
                short -= room.held(victim)
        life.waiting_for = room.holding(rows, self.settings.min_model_age) \
            if short > 0 else "models leaving"

    def _refuse(self, life: Life, error: LoadError) -> None:
        self.queue.remove(life)
        log.warning("refused %s: %s", life.key[1], error.message)
        self._ended(life, error)

    async def _account(self, rows: list[dict]) -> Accounting:
        promised = self._promised(rows)
        return await accounting(self.settings, rows, self.reserved(rows, promised),
                                room.growth(rows, {lf.key for lf in promised}))

    def _promised(self, rows: list[dict]) -> list[Life]:
        got = {(r["backend"], r["name"]): room.measured(r) for r in rows}
        return [lf for lf in self.lives.values()
                if lf.state == LOADING or (lf.state == WARM and lf.need and not got.get(lf.key))]

    def reserved(self, rows: list[dict], promised: list[Life] | None = None) -> int:
        """Memory promised to loads under way, and to loads just done until their own
        memory has been measured."""
        got = {(r["backend"], r["name"]): room.measured(r) for r in rows}
        return sum(max(0, lf.need - got.get(lf.key, 0))
                   for lf in (self._promised(rows) if promised is None else promised))

    # ---- loads and unloads, each beside the loop ------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start(self, life: Life) -> None:
        life.state, life.waiting_for = LOADING, ""
        if life.entry is not None and life.entry.rpc and \
                (note := self.footprints.memory_note(":".join(life.key), life.entry,
                                                     life.key[0])):
            log.info("%s uses the RPC workers %s; %s", life.key[1], ", ".join(life.entry.rpc),
                     note)
        self.metrics.loading(life.key, life.model)
        self._spawn(self._load(life))

    async def _load(self, life: Life) -> None:
        start = time.monotonic()
        try:
            async with asyncio.timeout(LOAD_TIMEOUT):
                await loading.load(life.key, life.entry, self.engine, self.ollama, self.session)
                if life.key[0] == "engine":
                    life.address = await self._address(life.key[1])
                    # before its first request: a conversation that goes on finds its cache
                    await self.contexts.restore(life.model, life.entry, life.address)
        except LoadError as e:
            self._ended(life, e)
            return
        except Exception as e:  # noqa: BLE001 - whatever it was, the waiters hear of it
            self._ended(life, LoadError(500, f"loading {life.key[1]} failed: "
                                        f"{str(e) or e.__class__.__name__}", "load_failed"))
            return
        seconds = life.load_seconds = time.monotonic() - start
        log.info("loaded %s on %s in %.1fs", life.key[1], life.key[0], seconds)
        self.metrics.loaded(life.key, life.model, "admission" if self.settings.memory_admission
                            else "no-admission", seconds)
        self.usage.touch(life.model)
        life.loaded_at = time.monotonic()
        self._ended(life, None)
        self._spawn(self._learn(life, life.loaded_at))

    def _ended(self, life: Life, error: LoadError | None) -> None:
        if error:
            life.state, life.need = FAILED, 0
            self.metrics.load_failed(life.key, life.model, error)
            if error.code != "insufficient_memory":  # a refusal is logged where it is made
                log.warning("loading %s on %s failed: %s", life.key[1], life.key[0],
                            error.message)
        else:
            life.state = WARM
        if life.outcome and not life.outcome.done():
            life.outcome.set_result(error)
        self.wake()

    async def _address(self, model_id: str) -> str | None:
        entry = self.holder.catalog.entries.get(model_id)
        if entry is None:
            return None
        running = await self.engine.running(self.session, Catalog(entries={model_id: entry}))
        r = running.get(model_id)
        return f"http://127.0.0.1:{r.port}" if r and r.state == "loaded" and r.port else None

    async def _learn(self, life: Life, loaded_at: float) -> None:
        """The footprint at load, measured once it has warmed up: the next estimate starts
        there (a prompt cache grown later is the allowance's, not the footprint's)."""
        await asyncio.sleep(SETTLE)
        if life.state != WARM or life.loaded_at != loaded_at or self.measure is None:
            return
        with contextlib.suppress(Exception):
            rows = await self.measure()
            got = next((room.measured(r) for r in rows
                        if (r["backend"], r["name"]) == life.key), 0)
            if got and life.state == WARM:
                what = shape(life.entry, life.key[0]) if life.entry else list(life.key)
                if self.footprints.learn(":".join(life.key), what, got):
                    await asyncio.to_thread(self.footprints.save)
        life.need = 0  # its own memory shows it now
        self.wake()

    def reload_cost(self, key: Key, entry: Entry | None) -> dict:
        """What bringing the model back would cost: its last load, and the prefill of its last
        context unless a saved context restores it (which counts in the choice of which
        model leaves; every model pays a load)."""
        life = self.lives.get(key)
        tokens, rate = self.metrics.contexts.get(life.model if life else key[1], (0, 0.0))
        saved = self.contexts.kept_for(entry)
        load = life.load_seconds if life and life.load_seconds is not None else None
        return {"load": round(load, 1) if load is not None else None,
                "prefill": 0.0 if saved or not rate else round(tokens / rate, 1),
                "context_saved": saved}

    def busy(self, model: str) -> int:
        use = self.usage.models.get(model)
        return use.in_flight if use else 0

    def _leave(self, key: Key, model: str, cause: str, detail: str, signal: str = "") -> bool:
        """Starts an unload of an idle warm model; False when it is not one now. Nothing is
        awaited between the check and the change, so no request slips in between."""
        life = self.life(key, model)
        if life.state != WARM or self.busy(model):
            return False
        life.state = DRAINING  # its address stays for the save
        life.settled.clear()
        self._spawn(self._unload(life, cause, detail, signal))
        return True

    async def unload(self, key: Key, model: str, cause: str, detail: str = "",
                     signal: str = "", force: bool = False,
                     idle_at_least: float | None = None) -> LoadError | None:
        """Unloads the model and returns once it has left (None), or why not: it is loading
        (waited for first), busy (unless forced), used within `idle_at_least` seconds (a
        policy decided on an older reading), or the backend failed."""
        life = self.life(key, model)
        if life.state in (QUEUED, LOADING):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOAD_TIMEOUT):
                    await asyncio.shield(life.outcome)
        if life.state in (DRAINING, UNLOADING):
            await self._settled(life)
            return None
        if life.state != WARM:
            return LoadError(409, f"{model} is not loaded", "model_not_loaded")
        use = self.usage.models.get(model)
        if idle_at_least is not None and use and (
                use.in_flight or time.time() - use.last_used < idle_at_least):
            return LoadError(409, f"{model} was used {time.time() - use.last_used:.0f}s ago",
                             "model_in_use")
        if use and use.in_flight and not force:
            return LoadError(409, f"{model} is serving {use.in_flight} request(s); unload it "
                             "anyway with force (`model unload --force`)", "model_busy")
        life.state = DRAINING  # its address stays for the save
        life.settled.clear()
        return await self._unload(life, cause, detail, signal)

    async def _settled(self, life: Life) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * UNLOAD_TIMEOUT):
                await life.settled.wait()

    async def _unload(self, life: Life, cause: str, detail: str,
                      signal: str) -> LoadError | None:
        backend, name = life.key
        life.state = UNLOADING
        try:
            entry = life.entry or self.holder.catalog.entries.get(name)
            if backend == "engine" and cause != "crash":  # bounded by its own timeouts
                await self.contexts.save(life.model, entry, life.address, self.holder.catalog)
            async with asyncio.timeout(UNLOAD_TIMEOUT):
                if backend == "ollama":
                    await self.ollama.unload(name)
                elif entry is None:
                    raise EngineError(f"{name} is no longer in the catalog")
                else:
                    await self.engine.unload(self.session, entry)
                while await self._listed(life.key):
                    await asyncio.sleep(0.1)
        except (OllamaUnavailable, OllamaError, EngineError, aiohttp.ClientError, ValueError,
                TimeoutError) as e:
            # it may still run: warm again, found or dropped by the next look
            life.state, life.address = WARM, await self._safe_address(life)
            life.settled.set()
            self.wake()
            why = str(e) or e.__class__.__name__
            log.warning("unloading %s from %s failed: %s", name, backend, why)
            code = "ollama_unavailable" if isinstance(e, OllamaUnavailable) else "engine_error"
            return LoadError(503, f"{backend}: {why}", code)
        life.state, life.need, life.entry, life.address = COLD, 0, None, None
        life.left_at = time.monotonic()
        life.settled.set()
        self.metrics.unloaded(life.key, life.model, cause, detail, signal)
        log.info("unloaded %s from %s (%s)%s", name, backend, cause,
                 f": {detail}" if detail else "")
        self.wake()
        return None

    async def keep_contexts(self) -> None:
        """At a stack stop, once requests have drained: each warm model's slots saved, as
        before any planned leaving, so that its conversations go on after the restart."""
        await asyncio.gather(*(
            self.contexts.save(lf.model, lf.entry, lf.address, self.holder.catalog)
            for lf in self.lives.values() if lf.key[0] == "engine" and lf.state == WARM))

    def engine_stopping(self) -> None:
        """The engine service is stopping (`model restart engine`), its models with it: each
        warm one is cold now, for that reason, not taken for a crash once it has gone; until
        the hold ends (the old engine has exited), looks leave the engine alone."""
        for life in self.lives.values():
            if life.key[0] == "engine" and life.state == WARM:
                self._gone(life, "engine-restart", "the engine service was restarted")

    async def _safe_address(self, life: Life) -> str | None:
        if life.key[0] != "engine":
            return None
        with contextlib.suppress(aiohttp.ClientError, ValueError, EngineError, TimeoutError):
            return await self._address(life.key[1])
        return None

    async def _listed(self, key: Key) -> bool:
        if key[0] == "ollama":
            return any(m.get("name") == key[1] for m in await self.ollama.ps())
        entry = self.holder.catalog.entries.get(key[1])
        if entry is None:
            return False
        return key[1] in await self.engine.running(self.session,
                                                   Catalog(entries={key[1]: entry}))

    # ---- what happened without us: a process ended, a model loaded elsewhere --------------

    def lost(self, key: Key) -> None:
        """A request found the model gone (its server's port closed, the engine no longer
        holds it): cold now, with the true reason, and the request loads it again."""
        life = self.lives.get(key)
        if life and life.state == WARM:
            self._gone(life, *self._why_gone(life))

    def let_go(self, key: Key) -> None:
        """Ollama unloads it at a client's keep_alive 0: cold, the next request loads it."""
        life = self.lives.get(key)
        if life and life.state == WARM:
            life.state, life.address, life.need = COLD, None, 0
            life.left_at = time.monotonic()
            self.metrics.unloaded(key, life.model, "manual", "keep_alive 0")
            log.info("unloaded %s from %s (manual): keep_alive 0", key[1], key[0])

    def _gone(self, life: Life, reason: str, detail: str) -> None:
        life.state, life.address, life.need, life.entry = COLD, None, 0, None
        life.left_at = time.monotonic()
        self.metrics.unloaded(life.key, life.model, reason, detail)
        log.info("%s left %s: %s (%s)", life.key[1], life.key[0], detail, reason)
        self.wake()

    def _why_gone(self, life: Life) -> tuple[str, str]:
        if life.key[0] == "ollama":
            return "ttl", "Ollama's keep_alive"
        if self.hold.holding:
            return "engine-reload", "the engine restarted it to take up its new config"
        now = self.holder.catalog.entries.get(life.key[1])
        if life.entry is not None and now != life.entry:
            return "config-restart", ("its settings changed" if now else
                                      "it left the catalog")
        return "crash", "its process ended without being asked to"

    async def follow(self, interval: float = 1.0) -> None:
        """Keeps each life true to the backends: a model can also leave when its process
        ends, Ollama unloads its models after their keep_alive, and a model loaded before
        this process started (or by Ollama for another client) is warm."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.look()
            except Exception as e:  # noqa: BLE001 - no failure may end the loop
                log.warning("cannot look at the backends now: %s", e)

    async def look(self, ollama: bool = False) -> None:
        """`ollama`: ask Ollama too, though none of its models is known to be loaded (one
        loaded there by another client)."""
        await asyncio.to_thread(self.holder.refresh)  # a restart is judged on the new config
        catalog, began = self.holder.catalog, time.monotonic()
        if catalog is not self._tidied:  # saved contexts of a model that changed go now
            self._tidied = catalog
            await asyncio.to_thread(self.contexts.tidy, catalog)
        seen: dict[str, dict[str, str | None]] = {}
        with contextlib.suppress(aiohttp.ClientError, ValueError, EngineError, TimeoutError):
            if self.hold.holding and self.hold.stopping:
                raise EngineError("the engine is stopping")  # its models are cold already
            async with asyncio.timeout(5):
                running = await self.engine.running(self.session, catalog)
            seen["engine"] = {m: f"http://127.0.0.1:{r.port}" if r.port else None
                              for m, r in running.items() if r.state == "loaded"}
        if ollama or any(k[0] == "ollama" and lf.state == WARM
                         for k, lf in self.lives.items()):
            with contextlib.suppress(OllamaUnavailable, OllamaError, ValueError, TimeoutError):
                async with asyncio.timeout(5):
                    seen["ollama"] = {m.get("name", ""): None for m in await self.ollama.ps()}
        for backend, held in seen.items():
            for key, life in list(self.lives.items()):
                if key[0] == backend and life.state == WARM and key[1] not in held \
                        and life.loaded_at < began:  # not loaded while we looked
                    self._gone(life, *self._why_gone(life))
            for name, address in held.items():
                entry = catalog.entries.get(name) if backend == "engine" else None
                life = self.life((backend, name), name if backend == "engine" else
                                 next((e.id for e in catalog.entries.values()
                                       if e.ollama == name), name))
                # loaded elsewhere (not one that left while we looked): counted, warm
                if life.state in (COLD, FAILED) and life.left_at < began:
                    life.state, life.entry, life.address = WARM, entry, address
                    self.usage.touch(life.model, only_if_unseen=True)
                elif life.state == WARM and address:
                    life.address = address
