"""Bridge → catalog → engine config → engine reload: rebuild them, write only what changed,
one writer at a time (STATE_DIR/sync.lock)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lm_studio_ollama_bridge import Bridge, SyncReport, read_store
from lm_studio_ollama_bridge.lock import locked
from shared import catalog as catalog_mod
from shared.catalog import Catalog
from shared.engines import Engine, EngineError
from shared.files import write_if_changed
from shared.proxy_client import ProxyClient, ProxyError
from shared.settings import Settings

log = logging.getLogger("model-serve.sync")
ENGINE_TIMEOUT = 30.0  # for the whole of a sync's talk with the engine and the proxy


@dataclass
class Reload:
    """What came of bringing the engine to the config on disk."""
    done: bool = False  # a running engine serves it
    error: str = ""  # why a running engine did not take it up ("": none is running)
    # the loaded models the engine's reload stopped (llama-swap's stops every one)
    stopped: list[str] = field(default_factory=list)


@dataclass
class SyncResult:
    catalog: Catalog
    catalog_changed: bool = False
    engine_changed: bool = False
    reload: Reload | None = None  # None: the engine serves the config, nothing was due


def sync_lock(settings: Settings) -> AbstractContextManager[None]:
    """Held by whatever writes the bridge's record, ids.json, catalog.json or the engine
    config, so two syncs at once (the sync service and `model pull`) lose nothing."""
    return locked(settings.state_dir / "sync.lock")


def reload_marker(settings: Settings) -> Path:
    """Present while the engine has not taken up the config written for it (its reload
    failed, or none was running): the config on disk then no longer differs from the catalog,
    so without it no later sync would reload the engine. A file, so that `model sync` and a
    restarted sync service see it too."""
    return settings.state_dir / "engine-reload-due"


def demo_root(settings: Settings) -> Path:
    return settings.state_dir / "demo-models"


def _ensure_demo(settings: Settings) -> Path:
    root = demo_root(settings)
    model = root / "demo" / "demo.gguf"
    if not model.is_file():
        from shared.tiny_gguf import write_model  # numpy: only on the first start

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
    return _write(settings, engine, servable(settings, engine))


def _write(settings: Settings, engine: Engine, catalog: Catalog) -> SyncResult:
    engine_changed = engine.write_config(catalog)
    catalog_changed = write_if_changed(settings.catalog_file, catalog.to_json())
    return SyncResult(catalog, catalog_changed, engine_changed)


def sync_all(settings: Settings, engine: Engine) -> tuple[SyncReport | None, SyncResult]:
    """Bridge, rebuild, and a running engine brought to the new config: what `model sync`
    and the sync service do on every change. A bridge that cannot run (an unreadable store)
    is logged; the catalog is still rebuilt. Blocking."""
    with sync_lock(settings):
        try:
            report = run_bridge(settings)
        except OSError as e:
            log.error("bridge failed: %s", e)
            report = None
        catalog = servable(settings, engine)
        return report, asyncio.run(_take_up(settings, engine, catalog))


def reload_if_due(settings: Settings, engine: Engine) -> Reload | None:
    """The reload of a config the engine has not taken up yet, tried again; None when none
    is due (another sync, `model sync`, has done it meanwhile). Blocking."""
    with sync_lock(settings):
        if not reload_marker(settings).exists():
            return None
        return asyncio.run(_reload_alone(settings, engine))


async def _reload_alone(settings: Settings, engine: Engine) -> Reload:
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ENGINE_TIMEOUT)) as session:
        return await _reload(settings, engine, session, [])


async def _take_up(settings: Settings, engine: Engine, catalog: Catalog) -> SyncResult:
    marker = reload_marker(settings)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENGINE_TIMEOUT)) as session,
        _held(settings, engine, catalog, session) as loaded,
    ):
        if engine.config_changes(catalog):
            marker.touch()  # before the config: a sync that dies between them still reloads
        engine_changed = engine.write_config(catalog)
        reload = await _reload(settings, engine, session, loaded if engine_changed else []) \
            if marker.exists() else None
        # the proxy's catalog last: a model it finds there is one the engine already serves
        # (a request for a model just added would otherwise reach an engine that has not
        # taken it up yet); written whether the reload worked or not
        catalog_changed = write_if_changed(settings.catalog_file, catalog.to_json())
        return SyncResult(catalog, catalog_changed, engine_changed, reload)


async def _reload(settings: Settings, engine: Engine, session: aiohttp.ClientSession,
                  loaded: list[str]) -> Reload:
    """The marker stays unless the engine took the config up. One that is not running
    reads the config when it starts, but it may be starting with the one before: its
    reload is tried again too, which does no harm."""
    try:
        await engine.reload(session)
    except aiohttp.ClientConnectorError:
        return Reload()
    # TimeoutError: one that accepts and never answers; ValueError: a reply that is not JSON
    except (aiohttp.ClientError, EngineError, TimeoutError, ValueError) as e:
        return Reload(error=_failure(engine, e))
    reload_marker(settings).unlink(missing_ok=True)
    return Reload(done=True, stopped=loaded)


def _failure(engine: Engine, e: Exception) -> str:
    if isinstance(e, EngineError):
        return str(e)
    where = f"{engine.name} at {engine.url}"
    if isinstance(e, TimeoutError):
        return f"{where} did not answer within {ENGINE_TIMEOUT:.0f} s"
    if isinstance(e, ValueError):
        return f"{where} answered what is not JSON ({e})"
    return f"{where}: {str(e) or type(e).__name__}"


@contextlib.asynccontextmanager
async def _held(settings: Settings, engine: Engine, catalog: Catalog,
                session: aiohttp.ClientSession) -> AsyncIterator[list[str]]:
    """Before a config change that makes the engine stop every model (llama-swap): the proxy
    holds new requests for them and lets those under way finish (DRAIN_SECONDS), until the
    engine serves the new config; yields the models still loaded, which it will stop. Without
    a proxy to ask (the stack is down) it goes on at once."""
    if not engine.reload_unloads_all or not engine.config_changes(catalog):
        yield []
        return
    proxy = ProxyClient(settings.proxy_url, session, settings.api_key, engine.key)
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(proxy.engine_held(settings.drain_seconds))
        except ProxyError as e:
            log.warning("the proxy does not hold requests during the engine's reload: %s", e)
        except (aiohttp.ClientError, TimeoutError):
            pass  # no proxy: no request to cut
        yield await _loaded(settings, engine, session)


async def _loaded(settings: Settings, engine: Engine,
                  session: aiohttp.ClientSession) -> list[str]:
    try:
        async with asyncio.timeout(5):
            return sorted(await engine.loaded(session, load_last_good(settings) or Catalog()))
    except (aiohttp.ClientError, EngineError, TimeoutError):
        return []
