"""What the backends hold and what each model takes: the rows of /running, which the owner
decides with, the governor reads and the dashboard shows. Memory is read as the OS holds it:
each model's own server process (mapped weights included), Ollama's runners."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import aiohttp

from shared.catalog import Entry
from shared.engines import EngineError
from shared.memory import Accounting, account, simulated_system
from shared.ollama import OllamaError, OllamaUnavailable
from shared.os_memory import memory_by_port, memory_of_ollama_runners, system_memory
from shared.settings import Settings

if TYPE_CHECKING:  # the context holds the owner, which measures through here
    from services.proxy.context import Context


async def _ollama_loaded(ctx: Context) -> dict[str, int] | None:
    """Ollama name → size of each model Ollama holds; None when Ollama is not there."""
    try:
        async with asyncio.timeout(3):
            return {m.get("name", ""): int(m.get("size", 0)) for m in await ctx.ollama.ps()}
    except (OllamaUnavailable, OllamaError, aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _ollama_entry(ctx: Context, name: str) -> Entry | None:
    return next((e for e in ctx.holder.catalog.entries.values() if e.ollama == name), None)


def _measure(ports: dict[str, int], blobs: dict[str, str]):
    return memory_by_port(ports), memory_of_ollama_runners(blobs) if blobs else {}


async def running_models(ctx: Context) -> tuple[list[dict], bool]:
    """Every loaded model on every backend. `memory.measured` is the model's own memory;
    `memory.reclaimable` the part of it the system's used figure leaves out (mapped weights),
    which the governor adds back."""
    catalog = ctx.holder.catalog
    try:
        async with asyncio.timeout(5):
            engine = await ctx.engine.running(ctx.session, catalog)
    except (aiohttp.ClientError, TimeoutError, ValueError, EngineError):
        engine = {}  # /health says the engine is down
    ollama_up = (ollama := await _ollama_loaded(ctx)) is not None
    ollama = ollama or {}
    ollama_entries = {name: _ollama_entry(ctx, name) for name in ollama}
    ports = {mid: r.port for mid, r in engine.items() if r.port}
    blobs = {name: os.path.realpath(e.path) for name, e in ollama_entries.items()
             if e and e.path}
    by_port, by_file = await asyncio.to_thread(_measure, ports, blobs)
    footprints = ctx.owner.footprints
    now = time.time()
    out = []

    def row(mid: str, name: str, entry: Entry | None, backend: str, state: str,
            measured: int | None, reclaimable: int | None) -> None:
        use = ctx.usage.models.get(mid)
        busy = bool(use and use.in_flight)
        last = ctx.usage.touch(mid, only_if_unseen=True) if state == "loaded" else (
            use.last_used if use and use.last_used else None)
        ttl = entry.ttl if entry else None
        key = f"{backend}:{name}"
        estimated = (footprints.estimate(key, entry, backend) if entry else
                     footprints.learned(key, [backend, name]))
        out.append({
            "id": mid, "name": name, "backend": backend, "state": state,
            # a model in use is not idle: its TTL runs from its last request's end
            "last_used": last, "idle_seconds": (0.0 if busy else round(now - last, 1))
            if last else None,
            "in_flight": use.in_flight if use else 0,
            "requests": use.requests if use else 0,
            "ttl": ttl or None,
            "expires_at": (now if busy else last) + ttl if last and ttl else None,
            "memory": {"estimated": estimated, "measured": measured,
                       "reclaimable": reclaimable},
            # what `memory` counts where it is not simply the model's process here (rpc:)
            **({"memory_note": note} if entry and (note := footprints.memory_note(
                key, entry, backend)) else {}),
            "pinned": bool(entry and entry.pin),
            "context_length": entry.ctx_size if entry else None,
            "parallel": entry.parallel if entry else None,
            "queue": ctx.limits.stats(mid),
            "reload": ctx.owner.reload_cost((backend, name), entry),
        })

    for mid, r in engine.items():
        mem = by_port.get(mid)
        # one the owner is unloading is not the governor's to pick again
        leaving = ctx.owner.state(("engine", mid)) in ("draining", "unloading")
        row(mid, mid, catalog.entries.get(mid), "engine", "unloading" if leaving else r.state,
            mem.total if mem else None, mem.reclaimable if mem else None)
    for name, size in ollama.items():
        entry = ollama_entries[name]
        # Ollama's runner measured like our own processes when it can be read; otherwise
        # the size Ollama reports, all of it added to the system's figure.
        mem = by_file.get(name)
        leaving = ctx.owner.state(("ollama", name)) in ("draining", "unloading")
        row(entry.id if entry else name, name, entry, "ollama",
            "unloading" if leaving else "loaded",
            mem.total if mem else size, mem.reclaimable if mem else size)
    return out, ollama_up


async def accounting(settings: Settings, rows: list[dict], reserved: int,
                     growth: int = 0) -> Accounting:
    """The machine's memory by the stack's count: what the system calls used, the models'
    mapped weights it leaves out, what loads under way have reserved and (for admission)
    what loaded models may still grow by."""
    sim = settings.memory_simulation
    system = await asyncio.to_thread(
        (lambda: simulated_system(sim, rows)) if sim else system_memory)
    return account(system, rows, reserved, settings.pressure_threshold, growth)
