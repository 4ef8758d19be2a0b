"""The governor's one loop. Like Ollama's scheduler (server/sched.go), it alone decides and
performs every load and unload. Timer ticks (TTL, memory pressure) and load requests from the
proxy arrive as events on one queue and are handled one at a time, so two decisions never race
over the same memory. A load runs beside the loop with its memory reserved until the model's
real footprint is measured; its end comes back to the loop as another event."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from shared import loading
from shared.catalog import Entry
from shared.catalog_holder import CatalogHolder
from shared.engines import Engine
from shared.loading import Key, LoadError
from shared.memory import Accounting, Footprints, account, first_estimate, shape, simulated_system
from shared.ollama import Ollama
from shared.os_memory import system_memory
from shared.pressure_signals import Signal
from shared.proxy_client import ProxyClient, ProxyError
from shared.settings import Settings

log = logging.getLogger("model-serve.governor")
GIB = 1024**3
UNLOAD_WAIT = 30.0  # seconds an unloaded model may take to leave /running
MEASURE_WAIT = 60.0  # seconds a finished load keeps its reservation if never measured
MAX_BACKOFF = 60.0  # seconds between attempts to unload a model whose unload keeps failing


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 1024**2:.0f} MiB"


def row_key(row: dict) -> Key:
    return row["backend"], row["name"]


def _memory(rows: list[dict]) -> int:
    """What these models free when they leave."""
    return sum(r["memory"]["measured"] or 0 for r in rows)


@dataclass
class LoadRequest:
    key: Key
    reply: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop()
                                  .create_future())


@dataclass
class LoadDone:
    key: Key
    error: LoadError | None
    seconds: float


@dataclass
class Loading:
    need: int
    waiters: list[asyncio.Future]
    done_at: float | None = None  # loaded; the reservation stays until a measurement


class Scheduler:
    def __init__(self, settings: Settings, proxy: ProxyClient, holder: CatalogHolder,
                 engine: Engine, ollama: Ollama, session: aiohttp.ClientSession,
                 signals) -> None:
        self.settings, self.proxy, self.holder = settings, proxy, holder
        self.engine, self.ollama, self.session, self.signals = engine, ollama, session, signals
        self.queue: asyncio.Queue[LoadRequest | LoadDone] = asyncio.Queue()
        self.footprints = Footprints(settings.footprints_file)
        self.loads: dict[Key, Loading] = {}
        self.backoff: dict[Key, tuple[int, float]] = {}  # failures, next attempt (monotonic)
        self.unloads: list[dict] = []  # what left memory, when and why: /health and logs
        self.admissions = 0  # cold loads judged
        self.problem: str | None = None  # the last failure, until a tick succeeds again
        self.memory: dict | None = None  # the last accounting and signals, as /health shows
        self.signals_quiet_until = 0.0
        self._stuck: set[str] = set()  # causes already warned of: once per episode
        self._tasks: set[asyncio.Task] = set()

    async def load(self, key: Key) -> dict:
        """Called by the proxy through /load: returns once the model is loaded or refused."""
        event = LoadRequest(key)
        await self.queue.put(event)
        return await event.reply

    async def run(self) -> None:
        for missing in self.signals.missing:
            log.warning("pressure signal unavailable, going on without it: %s", missing)
        next_tick = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(),
                                               max(0.0, next_tick - time.monotonic()))
            except TimeoutError:
                event = None
                next_tick = time.monotonic() + self.settings.pressure_interval
            try:
                if event is None:
                    await self.tick()
                elif isinstance(event, LoadRequest):
                    await self.admit(event)
                else:
                    self.finish(event)
            except Exception as e:  # noqa: BLE001 - no failure may end the loop
                if isinstance(e, aiohttp.ClientConnectorError) and self.memory is None \
                        and event is None:
                    continue  # the proxy is starting too: nothing to say yet
                problem = f"{e.__class__.__name__}: {e}"
                if problem != self.problem:  # once per episode, not at every tick
                    log.warning("cannot decide now (%s); will try again", problem,
                                exc_info=not isinstance(e, aiohttp.ClientError | ProxyError))
                self.problem = problem
                if isinstance(event, LoadRequest) and not event.reply.done():
                    log.warning("loading %s without admission", event.key[1])
                    self.start(event.key, self.entry(event.key), 0, [event.reply])

    # ---- what the loop sees ---------------------------------------------------------------

    async def rows(self) -> list[dict]:
        return (await self.proxy.running())["models"]

    def entry(self, key: Key) -> Entry | None:
        backend, name = key
        catalog = self.holder.catalog
        if backend == "engine":
            return catalog.entries.get(name)
        return next((e for e in catalog.entries.values() if e.ollama == name), None)

    def _shape(self, key: Key, entry: Entry | None) -> list:
        return shape(entry, key[0]) if entry else list(key)

    async def estimate(self, key: Key, entry: Entry | None) -> int:
        learned = self.footprints.learned(":".join(key), self._shape(key, entry))
        if learned:
            return learned
        if entry is None:  # one of Ollama's own models: its size in Ollama's list
            tags = await self.ollama.tags()
            file = next((int(t.get("size", 0)) for t in tags if t.get("name") == key[1]), 0)
            entry = Entry(id=key[1], path="", size_bytes=file)
        return first_estimate(entry)

    def _measured(self, key: Key, rows: list[dict]) -> int:
        return next((r["memory"]["measured"] or 0 for r in rows if row_key(r) == key), 0)

    async def account(self, rows: list[dict]) -> Accounting:
        sim = self.settings.memory_simulation
        system = await asyncio.to_thread(
            (lambda: simulated_system(sim, rows)) if sim else system_memory)
        reserved = sum(max(0, ld.need - self._measured(key, rows))
                       for key, ld in self.loads.items())
        return account(system, rows, reserved, self.settings.pressure_threshold)

    def victims(self, rows: list[dict], exclude: Key | None = None,
                skip: set[Key] | frozenset = frozenset()) -> list[dict]:
        """Idle, unpinned, loaded models, least recently used first. A model being loaded,
        used less than MIN_MODEL_AGE_SECONDS ago, or whose unload keeps failing is left."""
        now, mono = time.time(), time.monotonic()
        out = []
        for r in rows:
            key = row_key(r)
            if (r["state"] == "loaded" and not r["in_flight"] and not r["pinned"]
                    and key != exclude and key not in skip and key not in self.loads
                    and self.backoff.get(key, (0, 0.0))[1] <= mono
                    and r["last_used"] is not None
                    and now - r["last_used"] >= self.settings.min_model_age):
                out.append(r)
        return sorted(out, key=lambda r: r["last_used"])

    # ---- the tick: TTL, pressure, signals ------------------------------------------------

    async def tick(self) -> None:
        await asyncio.to_thread(self.holder.refresh)
        rows = await self.rows()
        self.settle(rows)
        signals = await asyncio.to_thread(self.signals.sample)
        acct = await self.account(rows)
        self.publish(acct, signals)
        rows = await self.relieve(await self.expire(rows))
        await self.heed(rows, signals)
        self.learn(rows)
        self.problem = None

    def publish(self, acct: Accounting, signals: list[Signal]) -> None:
        self.memory = {**acct.to_dict(),
                       "signals": {s.name: s.to_dict() for s in signals},
                       "firing": [s.describe() for s in signals if s.firing],
                       "missing": self.signals.missing}

    async def expire(self, rows: list[dict]) -> list[dict]:
        """Unload engine models idle past their TTL (Ollama keeps its own keep_alive)."""
        now = time.time()
        expired = [r for r in self.victims(rows) if r["backend"] == "engine" and r["ttl"]
                   and now - r["last_used"] >= r["ttl"]]
        for r in expired:
            await self.unload(r, f"idle {now - r['last_used']:.0f}s, TTL {r['ttl']}s", "ttl")
        return await self.rows() if expired else rows

    async def relieve(self, rows: list[dict]) -> list[dict]:
        """Above the threshold: unload least recently used idle models until below."""
        acct = await self.account(rows)
        skip: set[Key] = set()
        while acct.used_pct > self.settings.pressure_threshold:
            victims = self.victims(rows, skip=skip)
            if not victims:
                self._nothing_idle(rows, f"memory {acct.used_pct:.1f}% > "
                                         f"{self.settings.pressure_threshold:g}%", "pressure")
                return rows
            reason = f"memory pressure {acct.used_pct:.1f}% > {self.settings.pressure_threshold:g}%"
            if not await self.unload(victims[0], reason, "pressure", acct):
                skip.add(row_key(victims[0]))
            rows = await self.rows()
            acct = await self.account(rows)
        self._stuck.discard("pressure")
        return rows

    async def heed(self, rows: list[dict], signals: list[Signal]) -> None:
        """A pressure signal from the OS unloads one idle model, then gives the system a
        moment to recover before another may go."""
        firing = [s for s in signals if s.firing]
        if not firing:
            self._stuck.discard("signal")
        if not firing or time.monotonic() < self.signals_quiet_until:
            return
        why = "; ".join(s.describe() for s in firing)
        victims = self.victims(rows)
        if not victims:
            self._nothing_idle(rows, f"pressure signal {why}", "signal")
            return
        await self.unload(victims[0], f"pressure signal {why}", "signal",
                          signal=",".join(s.name for s in firing))
        self.signals_quiet_until = time.monotonic() + max(3.0,
                                                          2 * self.settings.pressure_interval)

    def _nothing_idle(self, rows: list[dict], why: str, cause: str) -> None:
        if cause not in self._stuck:
            held = [r["id"] for r in rows if r["in_flight"] or r["pinned"]]
            log.warning("%s but nothing idle to unload (busy or pinned: %s)", why,
                        ", ".join(held) or "none")
        self._stuck.add(cause)

    async def unload(self, row: dict, reason: str, cause: str,
                     acct: Accounting | None = None, signal: str = "") -> bool:
        """Through the proxy, which refuses (409) if a request has just arrived for it."""
        key, mid = row_key(row), row["id"]
        try:
            await self.proxy.unload(mid, backend=row["backend"], reason=cause, detail=reason,
                                    signal=signal)
        except ProxyError as e:
            if e.status == 409:
                log.info("did not unload %s: %s", mid, e)
            else:
                failures = self.backoff.get(key, (0, 0.0))[0] + 1
                wait = min(MAX_BACKOFF, self.settings.pressure_interval * 2 ** failures)
                self.backoff[key] = (failures, time.monotonic() + wait)
                log.warning("unloading %s from %s failed (%s); next try in %.0fs", mid,
                            row["backend"], e, wait)
            return False
        self.backoff.pop(key, None)
        numbers = (f"; memory {size(acct.used)} of {size(acct.total)} used "
                   f"({acct.used_pct:.1f}%)" if acct else "")
        log.info("unloaded %s (%s): %s%s; it measured %s", mid, row["backend"], reason,
                 numbers, size(row["memory"]["measured"] or 0))
        self.unloads.append({"model": mid, "backend": row["backend"], "cause": cause,
                             "reason": reason, "at": time.time()})
        del self.unloads[:-200]
        deadline = time.monotonic() + UNLOAD_WAIT
        while time.monotonic() < deadline:
            if all(row_key(r) != key for r in await self.rows()):
                return True
            await asyncio.sleep(0.1)
        log.warning("%s still listed %.0fs after its unload", mid, UNLOAD_WAIT)
        return True

    # ---- loads ---------------------------------------------------------------------------

    async def admit(self, event: LoadRequest) -> None:
        key = event.key
        current = self.loads.get(key)
        if current and current.done_at is None:  # single flight: wait for the same load
            current.waiters.append(event.reply)
            return
        entry = self.entry(key)
        if entry is None and await asyncio.to_thread(self.holder.refresh):
            entry = self.entry(key)  # the proxy may have read a newer catalog than ours
        if key[0] == "engine" and entry is None:  # the catalog changed meanwhile
            event.reply.set_result({"loaded": False, "error": LoadError(
                404, f"model {key[1]!r} is no longer in the catalog", "model_not_found")
                .to_dict()})
            return
        rows = await self.rows()
        self.settle(rows)  # a model loaded a moment ago may leave once measured
        if any(row_key(r) == key and r["state"] == "loaded" for r in rows):
            event.reply.set_result({"loaded": True})
            return
        need = await self.estimate(key, entry)
        skip: set[Key] = set()
        while (acct := await self.account(rows)).room < need:
            victims = self.victims(rows, exclude=key, skip=skip)
            if need > acct.room + _memory(victims):  # no unload helps: none is made
                event.reply.set_result(self.refusal(key, need, acct, rows))
                return
            reason = (f"making room for {key[1]} (needs {size(need)}, "
                      f"{size(max(acct.room, 0))} free)")
            if not await self.unload(victims[0], reason, "admission", acct):
                skip.add(row_key(victims[0]))
            rows = await self.rows()
        self.admissions += 1
        log.info("loading %s on %s: needs about %s, %s free under the limit", key[1], key[0],
                 size(need), size(acct.room))
        self.start(key, entry, need, [event.reply])

    def refusal(self, key: Key, need: int, acct: Accounting, rows: list[dict]) -> dict:
        busy = [r["id"] for r in rows if r["in_flight"]]
        pinned = [r["id"] for r in rows if r["pinned"]]
        free = max(acct.room, 0)
        if need > acct.room + _memory(rows):
            advice = ("it does not fit even with every model unloaded: raise "
                      "MEMORY_PRESSURE_THRESHOLD, or use a smaller quantisation or ctx_size")
        else:
            held = {"busy": busy, "pinned (unpin in custom_models.yaml)": pinned,
                    "loading": [k[1] for k, ld in self.loads.items() if ld.done_at is None],
                    "used moments ago": [r["id"] for r in rows if r["state"] == "loaded"
                                         and r["id"] not in busy + pinned]}
            advice = ("the models holding memory cannot leave now ("
                      + "; ".join(f"{why}: {', '.join(ids)}" for why, ids in held.items() if ids)
                      + "); try again when they are idle, or raise MEMORY_PRESSURE_THRESHOLD")
        message = (f"not enough memory to load {key[1]}: it needs about {size(need)}, "
                   f"{size(free)} is free under the {self.settings.pressure_threshold:g}% "
                   f"limit; {advice}")
        log.warning("refused %s: %s", key[1], message)
        return {"loaded": False, "error": {
            "status": 503, "code": "insufficient_memory", "message": message, "needed": need,
            "available": free, "busy": busy, "pinned": pinned}}

    def start(self, key: Key, entry: Entry | None, need: int,
              waiters: list[asyncio.Future]) -> None:
        self.loads[key] = Loading(need, waiters)
        task = asyncio.create_task(self._perform(key, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _perform(self, key: Key, entry: Entry | None) -> None:
        started = time.monotonic()
        error: LoadError | None = None
        try:
            await loading.load(key, entry, self.engine, self.ollama, self.session)
        except LoadError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - whatever it was, the waiters hear of it
            error = LoadError(500, f"loading {key[1]} failed: {e}", "load_failed")
        await self.queue.put(LoadDone(key, error, time.monotonic() - started))

    def finish(self, event: LoadDone) -> None:
        ld = self.loads.get(event.key)
        if ld is None:
            return
        if event.error:
            del self.loads[event.key]
            log.warning("loading %s failed after %.1fs: %s", event.key[1], event.seconds,
                        event.error.message)
            verdict = {"loaded": False, "error": event.error.to_dict()}
        else:
            ld.done_at = time.monotonic()
            log.info("loaded %s on %s in %.1fs", event.key[1], event.key[0], event.seconds)
            verdict = {"loaded": True}
        for waiter in ld.waiters:
            if not waiter.done():
                waiter.set_result(dict(verdict))

    def settle(self, rows: list[dict]) -> None:
        """A finished load's reservation ends once the model's own memory is measured, or
        once it has left (unloaded before it was measured); rows read in the first checks
        after the load may still be older than it."""
        now = time.monotonic()
        for key, ld in list(self.loads.items()):
            if ld.done_at is None:
                continue
            gone = now - ld.done_at > 2 * self.settings.pressure_interval and \
                all(row_key(r) != key for r in rows)
            if gone or self._measured(key, rows) or now - ld.done_at > MEASURE_WAIT:
                del self.loads[key]

    def learn(self, rows: list[dict]) -> None:
        changed = False
        for r in rows:
            if r["state"] == "loaded" and r["memory"]["measured"]:
                key = row_key(r)
                changed |= self.footprints.learn(":".join(key),
                                                 self._shape(key, self.entry(key)),
                                                 r["memory"]["measured"])
        if changed:
            self.footprints.save()
