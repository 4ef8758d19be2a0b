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

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from services.sync.watch import Watcher
from shared import logs
from shared import settings as settings_mod
from shared.engines import Engine, make_engine
from shared.settings import Settings
from shared.sync import sync_all

log = logging.getLogger("model-serve.sync")
RETRY_SECONDS = 5  # a sync that could not write STATE_DIR (a full disk) is tried again


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


def sync_once(settings: Settings, engine: Engine, retrying: bool = False) -> bool:
    """False when it could not be done (STATE_DIR cannot be written): the caller tries
    again, so a change seen while the disk was full is synced once it is not."""
    started = time.monotonic()
    try:
        report, result = sync_all(settings, engine)
    except OSError as e:
        if not retrying:
            log.error("sync failed (%s): trying again every %d s", e, RETRY_SECONDS)
        return False
    for line in report.lines() if report else []:
        log.info("bridge: %s", line)
    for notice in result.catalog.notices:
        log.warning("%s", notice)
    if result.reload_error:
        log.error("engine config updated, but %s", result.reload_error)
        return True
    if result.stopped:
        log.warning("%s stopped every loaded model to take up its new config: %s",
                    engine.name, ", ".join(result.stopped))
    log.info("synced in %.0f ms: %d models%s", (time.monotonic() - started) * 1000,
             len(result.catalog.entries),
             "" if not result.engine_changed else
             ", engine reloaded" if result.reloaded else ", engine not running")
    return True


def main() -> None:
    logs.setup("sync")
    settings = settings_mod.load()
    engine = make_engine(settings)
    changes = Changes()
    watcher = Watcher([settings.ollama_models / "manifests", settings.models_dir], changes)
    failed = not sync_once(settings, engine)
    next_full = time.monotonic() + (settings.bridge_sync_interval or float("inf"))
    try:
        while True:
            timeout = max(0.0, next_full - time.monotonic())
            if changes.pending.wait(timeout=min(timeout, RETRY_SECONDS if failed else 3600)):
                while time.monotonic() - changes.last < settings.sync_debounce:
                    time.sleep(settings.sync_debounce / 3)
                changes.pending.clear()
            elif not failed:  # else the sync that failed is tried again
                if time.monotonic() < next_full:
                    continue
                next_full = time.monotonic() + settings.bridge_sync_interval
            watcher.refresh()
            failed = not sync_once(settings, engine, retrying=failed)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


if __name__ == "__main__":
    main()
