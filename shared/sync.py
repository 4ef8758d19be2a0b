"""Bridge → catalog → engine config: rebuild them, write only what changed, one writer at a
time (STATE_DIR/sync.lock)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from lm_studio_ollama_bridge import Bridge, SyncReport, read_store
from lm_studio_ollama_bridge.lock import locked
from shared import catalog as catalog_mod
from shared.catalog import Catalog
from shared.engines import Engine, EngineError
from shared.files import write_if_changed
from shared.settings import Settings
from shared.tiny_gguf import write_model

log = logging.getLogger("model-serve.sync")


@dataclass
class SyncResult:
    catalog: Catalog
    catalog_changed: bool = False
    engine_changed: bool = False


def sync_lock(settings: Settings) -> AbstractContextManager[None]:
    """Held by whatever writes the bridge's record, ids.json, catalog.json or the engine
    config, so two syncs at once (the sync service and `model pull`) lose nothing."""
    return locked(settings.state_dir / "sync.lock")


def demo_root(settings: Settings) -> Path:
    return settings.state_dir / "demo-models"


def _ensure_demo(settings: Settings) -> Path:
    root = demo_root(settings)
    model = root / "demo" / "demo.gguf"
    if not model.is_file():
        write_model(model, name="demo")
    return root


def load_last_good(settings: Settings) -> Catalog | None:
    try:
        return Catalog.from_json(settings.catalog_file.read_text())
    except (OSError, ValueError, TypeError):
        return None


def run_bridge(settings: Settings, dry_run: bool = False) -> SyncReport:
    """Link Ollama's GGUF models into MODELS_DIR/ollama; only the bridge's own links change."""
    models, notices = read_store(settings.ollama_models)
    report = Bridge(settings.models_dir, settings.bridge_record).sync(models, dry_run)
    report.notices[:0] = notices
    return report


def rebuild(settings: Settings, engine: Engine) -> SyncResult:
    """Blocking (disk and GGUF headers): call it off the event loop. The caller shows the
    catalog's notices (the sync service logs them, the CLI prints them), each once."""
    with sync_lock(settings):
        return _rebuild(settings, engine)


def servable(settings: Settings, engine: Engine) -> Catalog:
    """The catalog as it will be served: the demo model when there is nothing else, and
    without what this engine cannot run (each with a notice). Hold sync_lock around it."""
    catalog = catalog_mod.build(settings)
    if not catalog.entries and settings.demo_model:
        catalog = catalog_mod.build(settings, [settings.models_dir, _ensure_demo(settings)])
    refused = engine.refusals(catalog)
    catalog.notices += [f"{mid}: {engine.name} serves it without {value}"
                        for mid, values in engine.left_out(catalog).items() for value in values]
    for mid, reason in refused.items():  # left out, so clients are not offered it either
        catalog.notices.append(f"{mid}: not served by {engine.name}: {reason}")
        del catalog.entries[mid]
    if refused:
        catalog.reindex()
    return catalog


def _rebuild(settings: Settings, engine: Engine) -> SyncResult:
    catalog = servable(settings, engine)
    engine_changed = engine.write_config(catalog)
    catalog_changed = write_if_changed(settings.catalog_file, catalog.to_json())
    return SyncResult(catalog, catalog_changed, engine_changed)


def sync_all(settings: Settings, engine: Engine) -> tuple[SyncReport | None, SyncResult]:
    """Bridge then rebuild: what `model sync` and the sync service do on every change.
    A bridge that cannot run (an unreadable store) is logged; the catalog is still rebuilt."""
    with sync_lock(settings):
        try:
            report = run_bridge(settings)
        except OSError as e:
            log.error("bridge failed: %s", e)
            report = None
        return report, _rebuild(settings, engine)


async def apply(result: SyncResult, engine: Engine, session: aiohttp.ClientSession) -> bool:
    """Tell a running engine about a changed config; False when no engine answered."""
    if not result.engine_changed:
        return True
    try:
        await engine.reload(session)
    except aiohttp.ClientConnectionError:
        return False
    return True


def held_before_reload(settings: Settings, engine: Engine) -> list[str]:
    """The models a reload will unload when the engine's reload stops every loaded model ([]
    otherwise, and when it does not answer). Asked before the config is written: the engine
    may take the new file up at once, and then they are gone before anyone could name them."""
    if not engine.reload_unloads_all:
        return []

    async def go() -> list[str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return sorted(await engine.loaded(session, load_last_good(settings) or Catalog()))

    try:
        return asyncio.run(go())
    except (aiohttp.ClientError, EngineError, TimeoutError):
        return []


def reload_engine(result: SyncResult, engine: Engine) -> bool:
    """`apply` for a caller without an event loop (the CLI, the sync service); EngineError
    when the engine answers but does not take the new config up."""

    async def go() -> bool:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await apply(result, engine, session)

    return asyncio.run(go())
