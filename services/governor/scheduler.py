"""The governor's one loop. Like Ollama's scheduler, it alone decides what leaves memory:
pressure checks on a timer and admission requests from the proxy arrive as events on one
queue and are handled one at a time, so two decisions never race over the same memory."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from shared.catalog_holder import CatalogHolder
from shared.memory import Footprints, Reading, simulated_reading, system_reading
from shared.proxy_client import ProxyClient, ProxyError
from shared.settings import Settings

log = logging.getLogger("model-serve.governor")
GIB = 1024**3


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 1024**2:.0f} MiB"


@dataclass
class Admit:
    model: str
    reply: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop()
                                  .create_future())


class Scheduler:
    def __init__(self, settings: Settings, proxy: ProxyClient, holder: CatalogHolder) -> None:
        self.settings, self.proxy, self.holder = settings, proxy, holder
        self.queue: asyncio.Queue[Admit] = asyncio.Queue()
        self.footprints = Footprints(settings.footprints_file)
        self.unloads: list[dict] = []  # what was unloaded, when and why: for /health and logs
        self.last_reading: Reading | None = None
        self.admissions = 0  # cold loads judged
        self._stuck = False

    async def admit(self, model: str) -> dict:
        event = Admit(model)
        await self.queue.put(event)
        return await event.reply

    async def run(self) -> None:
        next_check = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(),
                                               max(0.0, next_check - time.monotonic()))
            except TimeoutError:
                event = None
            try:
                if event is None:
                    next_check = time.monotonic() + self.settings.pressure_interval
                    await self.relieve_pressure()
                else:
                    event.reply.set_result(await self.decide_admission(event.model))
            except (aiohttp.ClientError, ProxyError, TimeoutError) as e:
                log.warning("proxy not answering (%s); will try again", e)
                if event is not None and not event.reply.done():
                    event.reply.set_result({"admitted": True,
                                            "message": "the governor could not check"})

    async def _models(self) -> list[dict]:
        return (await self.proxy.running())["models"]

    async def _read(self, models: list[dict]) -> Reading:
        measured = sum(m["memory"]["measured"] or 0 for m in models)
        sim = self.settings.memory_simulation
        reading = await asyncio.to_thread(
            lambda: simulated_reading(sim, measured) if sim else system_reading())
        self.last_reading = reading
        return reading

    def _limit(self, reading: Reading) -> float:
        return reading.total * self.settings.pressure_threshold / 100

    def _candidates(self, models: list[dict], exclude: str | None = None) -> list[dict]:
        """Idle, unpinned, loaded models, least recently used first."""
        now = time.time()
        idle = [m for m in models
                if m["state"] == "loaded" and not m["in_flight"] and not m["pinned"]
                and m["id"] != exclude
                and (m["last_used"] is None
                     or now - m["last_used"] >= self.settings.min_model_age)]
        return sorted(idle, key=lambda m: m["last_used"] or 0.0)

    async def _unload(self, model: dict, reason: str, reading: Reading) -> bool:
        mid = model["id"]
        try:
            await self.proxy.unload(mid)
        except ProxyError as e:
            log.info("did not unload %s: %s", mid, e)  # e.g. a request arrived meanwhile
            return False
        log.info("unloaded %s (%s backend): %s; memory %s of %s used (%.1f%%), model "
                 "measured %s", mid, model["backend"], reason, size(reading.used),
                 size(reading.total), reading.used_pct, size(model["memory"]["measured"] or 0))
        self.unloads.append({"model": mid, "reason": reason, "at": time.time()})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(m["id"] != mid for m in await self._models()):
                return True
            await asyncio.sleep(0.05)
        log.warning("%s still listed 30 s after its unload", mid)
        return True

    def _learn(self, models: list[dict]) -> None:
        changed = False
        for m in models:
            entry = self.holder.catalog.entries.get(m["id"])
            if entry and m["memory"]["measured"] and m["state"] == "loaded":
                changed |= self.footprints.learn(entry, m["memory"]["measured"])
        if changed:
            self.footprints.save()

    async def relieve_pressure(self) -> None:
        await asyncio.to_thread(self.holder.refresh)
        models = await self._models()
        self._learn(models)
        reading = await self._read(models)
        while reading.used_pct > self.settings.pressure_threshold:
            victims = self._candidates(models)
            if not victims:
                if not self._stuck:
                    busy = [m["id"] for m in models if m["in_flight"] or m["pinned"]]
                    log.warning("memory %.1f%% > %.0f%% but nothing idle to unload (busy or "
                                "pinned: %s)", reading.used_pct,
                                self.settings.pressure_threshold, ", ".join(busy) or "none")
                self._stuck = True
                return
            reason = (f"memory pressure {reading.used_pct:.1f}% > "
                      f"{self.settings.pressure_threshold:.0f}%")
            await self._unload(victims[0], reason, reading)
            models = await self._models()
            reading = await self._read(models)
        self._stuck = False

    async def decide_admission(self, model: str) -> dict:
        await asyncio.to_thread(self.holder.refresh)
        entry = self.holder.catalog.resolve(model)
        models = await self._models()
        if entry is None or any(m["id"] == entry.id and m["state"] != "sleeping"
                                for m in models):
            return {"admitted": True}
        self.admissions += 1
        need = self.footprints.estimate(entry)
        while True:
            reading = await self._read(models)
            room = self._limit(reading) - reading.used
            if need <= room:
                return {"admitted": True, "needed": need, "available": int(room)}
            victims = self._candidates(models, exclude=entry.id)
            if not victims:
                busy = [m["id"] for m in models if m["in_flight"] or m["pinned"]]
                message = (f"not enough memory to load {entry.id}: it needs about "
                           f"{size(need)}, {size(max(room, 0))} is free under the "
                           f"{self.settings.pressure_threshold:.0f}% limit, and the loaded "
                           f"models are busy or pinned ({', '.join(busy) or 'none'})")
                log.warning("refused %s: %s", entry.id, message)
                return {"admitted": False, "message": message, "needed": need,
                        "available": int(max(room, 0)), "busy": busy}
            await self._unload(victims[0], f"making room for {entry.id} "
                               f"(needs {size(need)}, {size(max(room, 0))} free)", reading)
            models = await self._models()
