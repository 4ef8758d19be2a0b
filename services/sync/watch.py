"""Which folders the sync watches: Ollama's manifests and MODELS_DIR, each recursively once it
exists. One that does not exist yet (a new MODELS_DIR, Ollama not yet run) is waited for from
its nearest existing parent, without creating it: that is Ollama's or LM Studio's to do, or
the user's. A watched folder that is removed (Ollama removes an emptied manifests folder, and
makes it again at its next start or pull) ends its watch: it is waited for again."""

from __future__ import annotations

import logging
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

log = logging.getLogger("model-serve.sync")


class Appearing(FileSystemEventHandler):
    """On a waited-for folder's parent: only what is on the way to the folder counts, so that
    a busy parent (a home folder, /tmp) does not set off syncs."""

    def __init__(self, changes: FileSystemEventHandler, folder: Path) -> None:
        self.changes, self.folder = changes, folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(p and (Path(p) == self.folder or Path(p) in self.folder.parents)
               for p in map(str, paths)):
            self.changes.on_any_event(event)


class Watcher:
    def __init__(self, folders: list[Path], changes: FileSystemEventHandler) -> None:
        self.changes = changes
        self.observer = Observer()
        # folder not there yet → the watch on its nearest existing parent
        self.waiting: dict[Path, ObservedWatch | None] = {}
        self.watched: dict[Path, ObservedWatch] = {}
        for folder in folders:
            if folder.is_dir():
                self._watch(folder)
            else:
                log.warning("%s does not exist (yet); watching for it", folder)
                self.waiting[folder] = None
        self.refresh()
        self.observer.start()

    def _watch(self, folder: Path) -> None:
        self.watched[folder] = self.observer.schedule(self.changes, str(folder), recursive=True)
        log.info("watching %s", folder)

    def _ended(self) -> None:
        """Watches whose folder was removed (the removal is an event, so a sync follows):
        their folders are waited for again, from the parent."""
        alive = {e.watch for e in self.observer.emitters if e.is_alive()}
        for folder, watch in list(self.watched.items()):
            if watch not in alive and self.observer.is_alive():
                log.warning("%s was removed; watching for it again", folder)
                self.observer.unschedule(watch)
                del self.watched[folder]
                self.waiting[folder] = None

    def refresh(self) -> None:
        """Called before each sync: a waited-for folder that now exists is watched, and the
        sync that follows reads what it already holds."""
        self._ended()
        for folder in list(self.waiting):
            # after each new watch, look again: what was created before it raised no event
            while folder in self.waiting:
                current = self.waiting[folder]
                if folder.is_dir():
                    if current:
                        self.observer.unschedule(current)
                    del self.waiting[folder]
                    self._watch(folder)
                    break
                parent = next(p for p in folder.parents if p.is_dir())
                if current and Path(current.path) == parent:
                    break
                if current:
                    self.observer.unschedule(current)
                self.waiting[folder] = self.observer.schedule(
                    Appearing(self.changes, folder), str(parent), recursive=False)

    def stop(self) -> None:
        self.observer.stop()
