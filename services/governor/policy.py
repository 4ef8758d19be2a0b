"""The governor's policy: it watches the machine and the models' idleness and asks the proxy,
which owns each model's life, to unload idle models: past their TTL, when memory runs short
(least recently used first), when the OS signals pressure. It reads the owner's state and
memory accounting from /running; loads never wait for it, so serving goes on while it is
stopped."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from shared.pressure_signals import Signal
from shared.proxy_client import ProxyClient, ProxyError
from shared.room import idle_lru, measured, size
from shared.settings import Settings

log = logging.getLogger("model-serve.governor")
MAX_BACKOFF = 60.0  # seconds between attempts to unload a model whose unload keeps failing


class Policy:
    def __init__(self, settings: Settings, proxy: ProxyClient, signals) -> None:
        self.settings, self.proxy, self.signals = settings, proxy, signals
        self.backoff: dict[str, tuple[int, float]] = {}  # failures, next attempt (monotonic)
        self.unloads: list[dict] = []  # what left memory, when and why: /health and logs
        self.problem: str | None = None  # the last failure, until a tick succeeds again
        self.memory: dict | None = None  # the last accounting and signals, as /health shows
        self.signals_quiet_until = 0.0
        self._stuck: set[str] = set()  # causes already warned of: once per episode

    async def run(self) -> None:
        log.info("watching TTLs, memory above %g%% and the OS's pressure signals every %gs",
                 self.settings.pressure_threshold, self.settings.pressure_interval)
        for missing in self.signals.missing:
            log.warning("pressure signal unavailable, going on without it: %s", missing)
        while True:
            try:
                await self.tick()
                self.problem = None
            except Exception as e:  # noqa: BLE001 - no failure may end the loop
                if isinstance(e, aiohttp.ClientConnectorError) and self.memory is None:
                    pass  # the proxy is starting too: nothing to say yet
                else:
                    problem = f"{e.__class__.__name__}: {e}"
                    if problem != self.problem:  # once per episode, not at every tick
                        log.warning("cannot decide now (%s); will try again", problem,
                                    exc_info=not isinstance(e, aiohttp.ClientError | ProxyError))
                    self.problem = problem
            await asyncio.sleep(self.settings.pressure_interval)

    async def tick(self) -> None:
        rows, system = await self.read()
        signals = await asyncio.to_thread(self.signals.sample)
        self.publish(system, signals)
        if await self.expire(rows):
            rows, system = await self.read()
        if await self.relieve(rows, system):
            rows, system = await self.read()
        await self.heed(rows, signals)

    async def read(self) -> tuple[list[dict], dict]:
        running = await self.proxy.running()
        return running["models"], running["system"]

    def publish(self, system: dict, signals: list[Signal]) -> None:
        self.memory = {**{k: v for k, v in system.items()
                          if k not in ("signals", "firing", "missing", "governor")},
                       "signals": {s.name: s.to_dict() for s in signals},
                       "firing": [s.describe() for s in signals if s.firing],
                       "missing": self.signals.missing}

    def victims(self, rows: list[dict]) -> list[dict]:
        mono = time.monotonic()
        return [r for r in idle_lru(rows, self.settings.min_model_age)
                if self.backoff.get(r["id"], (0, 0.0))[1] <= mono]

    async def expire(self, rows: list[dict]) -> bool:
        """Engine models idle past their TTL (Ollama keeps its own keep_alive)."""
        now, done = time.time(), False
        for r in self.victims(rows):
            if r["backend"] == "engine" and r["ttl"] and now - r["last_used"] >= r["ttl"]:
                done |= await self.unload(r, f"idle {now - r['last_used']:.0f}s, TTL "
                                             f"{r['ttl']}s", "ttl", idle_at_least=r["ttl"])
        return done

    async def relieve(self, rows: list[dict], system: dict) -> bool:
        """Above the limit: idle models leave, least recently used first, until enough has
        left to bring use under it. When unloading every idle model would not (other programs
        hold the memory, or busy models), none is unloaded for nothing: that is said."""
        # its own MEMORY_PRESSURE_THRESHOLD (the proxy's admission reads the same setting)
        threshold = self.settings.pressure_threshold
        over = system.get("used", 0) - int(system.get("total", 0) * threshold / 100)
        if over <= 0:
            self._stuck.discard("pressure")
            self.memory = {**(self.memory or {}), "note": None}
            return False
        victims = self.victims(rows)
        # idle, but used moments ago (MIN_MODEL_AGE_SECONDS) or backing off: they may go soon
        soon = [r for r in rows if r["state"] == "loaded" and not r.get("in_flight")
                and not r.get("pinned") and r not in victims]
        if sum(measured(r) for r in victims) < over and soon:
            self.memory = {**(self.memory or {}), "note": (
                f"memory {system['used_pct']}% > {threshold:g}%: waiting for "
                f"{', '.join(r['id'] for r in soon)} (used moments ago) to be idle long "
                "enough to leave")}
            return False
        if sum(measured(r) for r in victims) < over:
            held = system.get("other_programs", 0)
            note = (f"memory {system['used_pct']}% > {threshold:g}%: other "
                    f"programs hold {size(held)}; unloading every idle model "
                    f"({size(sum(measured(r) for r in victims))}) would not bring use under "
                    "the limit, so none is unloaded"
                    + (f" (busy or pinned: {', '.join(busy)})"
                       if (busy := [r["id"] for r in rows if r.get("in_flight") or
                                    r.get("pinned")]) else ""))
            self.memory = {**(self.memory or {}), "note": note}
            if "pressure" not in self._stuck:
                log.warning("%s", note)
            self._stuck.add("pressure")
            return False
        freed, done = 0, False
        reason = f"memory pressure {system['used_pct']}% > {threshold:g}%"
        for r in victims:
            if freed >= over:
                break
            if await self.unload(r, reason, "pressure",
                                 idle_at_least=self.settings.min_model_age):
                freed += measured(r)
                done = True
        return done

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
            if "signal" not in self._stuck:
                log.warning("pressure signal %s but nothing idle to unload", why)
            self._stuck.add("signal")
            return
        await self.unload(victims[0], f"pressure signal {why}", "signal",
                          signal=",".join(s.name for s in firing),
                          idle_at_least=self.settings.min_model_age)
        self.signals_quiet_until = time.monotonic() + max(3.0,
                                                          2 * self.settings.pressure_interval)

    async def unload(self, row: dict, reason: str, cause: str, signal: str = "",
                     idle_at_least: float | None = None) -> bool:
        """Through the proxy, which refuses (409) if the model was used meanwhile; returns
        once it has left."""
        mid = row["id"]
        try:
            await self.proxy.unload(mid, backend=row["backend"], reason=cause, detail=reason,
                                    signal=signal, idle_at_least=idle_at_least)
        except ProxyError as e:
            if e.status == 409:
                log.info("did not unload %s: %s", mid, e)
            else:
                failures = self.backoff.get(mid, (0, 0.0))[0] + 1
                wait = min(MAX_BACKOFF, self.settings.pressure_interval * 2 ** failures)
                self.backoff[mid] = (failures, time.monotonic() + wait)
                log.warning("unloading %s from %s failed (%s); next try in %.0fs", mid,
                            row["backend"], e, wait)
            return False
        self.backoff.pop(mid, None)
        log.info("unloaded %s (%s): %s; it measured %s", mid, row["backend"], reason,
                 size(measured(row)))
        self.unloads.append({"model": mid, "backend": row["backend"], "cause": cause,
                             "reason": reason, "at": time.time()})
        del self.unloads[:-200]
        return True
