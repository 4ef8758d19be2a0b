"""The sync process: filesystem events → bridge → catalog → engine config → engine reload.

Watchdog reports changes under Ollama's manifests folder (Ollama writes a manifest last, once
a pull is complete) and under MODELS_DIR, also one created after the start (watch.py). Events
are debounced, so a burst of files gives one sync. A periodic full resync
(BRIDGE_SYNC_INTERVAL) is only a safety net.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import aiohttp
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from services.sync.watch import Watcher
from shared import logs
from shared import settings as settings_mod
from shared.engines import Engine, EngineError, make_engine
from shared.settings import Settings
from shared.sync import Reload, reload_if_due, sync_all

log = logging.getLogger("model-serve.sync")
RETRY_SECONDS = 5  # a sync that could not write STATE_DIR (a full disk) is tried again
# a reload the engine did not take up is tried again: soon at first (an engine restarting),
# then seldom (one that stays down or keeps refusing)
RELOAD_RETRY_FIRST, RELOAD_RETRY_MAX = 2.0, 60.0
# faults from outside the code (the disk, the engine): logged without a traceback
OUTSIDE = (OSError, aiohttp.ClientError, EngineError)


class Changes(FileSystemEventHandler):
    """Remembers when the last relevant event came; the sync loop waits for quiet."""

    def __init__(self) -> None:
        self.pending = threading.Event()
        self.last = 0.0

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        self.last = time.monotonic()
        self.pending.set()


def sync_once(settings: Settings, engine: Engine) -> Reload | None:
    """One full sync, logged; what came of the engine's reload, if one was due. Raises
    whatever stopped it."""
    started = time.monotonic()
    report, result = sync_all(settings, engine)
    for line in report.lines() if report else []:
        log.info("bridge: %s", line)
    for notice in result.catalog.notices:
        log.warning("%s", notice)
    reload = result.reload
    if reload and reload.stopped:
        log.warning("%s stopped every loaded model to take up its new config: %s",
                    engine.name, ", ".join(reload.stopped))
    log.info("synced in %.0f ms: %d models%s", (time.monotonic() - started) * 1000,
             len(result.catalog.entries),
             "" if reload is None else ", engine reloaded" if reload.done else
             ", engine reload failed" if reload.error else ", engine not running")
    return reload


class Service:
    """What is left to do between syncs, and the fault under way: each fault is logged when
    it begins (again only when another takes its place) and when it is over, not on every
    try."""

    def __init__(self, settings: Settings, engine: Engine, watcher: Watcher) -> None:
        self.settings, self.engine, self.watcher = settings, engine, watcher
        self.failed = False  # the last sync did not finish: the next try is a whole sync
        self.reload_wait: float | None = None  # the engine has not taken up its config
        self.fault: str | None = None  # the one logged, until it is over
        self.failures = 0  # tries during the fault

    def due_in(self) -> float | None:
        """Seconds until what is left is tried again; None when nothing is left."""
        return RETRY_SECONDS if self.failed else self.reload_wait

    def sync(self) -> None:
        self._attempt(self._full)

    def retry(self) -> None:
        if self.failed:
            self.sync()
        else:
            self._attempt(lambda: reload_if_due(self.settings, self.engine))

    def _full(self) -> Reload | None:
        self.watcher.refresh()
        return sync_once(self.settings, self.engine)

    def _attempt(self, step: Callable[[], Reload | None]) -> None:
        try:
            reload = step()
        except OUTSIDE as e:
            self.failed = True
            self._began("a failed sync", "sync failed (%s): trying again every %d s",
                        str(e) or type(e).__name__, RETRY_SECONDS)
            return
        except Exception as e:  # noqa: BLE001 - not even a fault of the code's own ends the loop
            self.failed = True
            self._began(f"an unexpected {type(e).__name__}",
                        "sync failed: trying again every %d s", RETRY_SECONDS, exc_info=e)
            return
        self.failed = False
        if reload is None or reload.done:
            self.reload_wait = None
            self._over()
        else:
            self._reload_failed(reload)

    def _reload_failed(self, reload: Reload) -> None:
        self.reload_wait = RELOAD_RETRY_FIRST if self.reload_wait is None else \
            min(self.reload_wait * 2, RELOAD_RETRY_MAX)
        if reload.error:
            self._began("a failed engine reload", "engine config written, but the engine did "
                        "not take it up: %s; reloading it again, every %.0f s at most",
                        reload.error, RELOAD_RETRY_MAX)
        else:  # as when the stack starts, or the engine restarts: no error yet
            self._began("an engine not running", "%s is not running to take up its new "
                        "config: reloading it again once it is (every %.0f s at most)",
                        self.engine.name, RELOAD_RETRY_MAX, level=logging.WARNING)

    def _began(self, fault: str, message: str, *args: object, level: int = logging.ERROR,
               exc_info: Exception | None = None) -> None:
        self.failures = self.failures + 1 if self.fault else 1
        if fault != self.fault:
            log.log(level, message, *args, exc_info=exc_info)
            self.fault = fault

    def _over(self) -> None:
        if self.fault:
            log.info("recovered from %s (failed tries: %d)", self.fault, self.failures)
            self.fault = None


def main() -> None:
    logs.setup("sync")
    settings = settings_mod.load()
    engine = make_engine(settings)
    changes = Changes()
    watcher = Watcher([settings.ollama_models / "manifests", settings.models_dir], changes)
    service = Service(settings, engine, watcher)
    service.sync()
    next_full = time.monotonic() + (settings.bridge_sync_interval or float("inf"))
    try:
        while True:
            due = service.due_in()
            timeout = max(0.0, next_full - time.monotonic())
            if changes.pending.wait(timeout=min(timeout, 3600 if due is None else due)):
                while time.monotonic() - changes.last < settings.sync_debounce:
                    time.sleep(settings.sync_debounce / 3)
                changes.pending.clear()
                service.sync()
            elif due is not None:
                service.retry()
            elif time.monotonic() >= next_full:
                next_full = time.monotonic() + settings.bridge_sync_interval
                service.sync()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


if __name__ == "__main__":
    main()
