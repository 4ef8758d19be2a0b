"""The current catalog, for a long-running service that only reads it."""

from __future__ import annotations

import asyncio
import logging
import os

from shared.catalog import Catalog, Entry
from shared.settings import Settings
from shared.sync import load_last_good

log = logging.getLogger("model-serve")


class CatalogHolder:
    """Follows STATE_DIR/catalog.json, which only the sync step writes."""

    def __init__(self, settings: Settings, interval: float = 0.25) -> None:
        self.settings = settings
        self.interval = interval
        self.catalog = Catalog()
        self._stamp: tuple[int, int] | None = None

    def _stamp_now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.settings.catalog_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> bool:
        """Blocking; run it in a thread. True when a new catalog was taken up."""
        stamp = self._stamp_now()
        if stamp is None or stamp == self._stamp:
            return False
        catalog = load_last_good(self.settings)
        if catalog is None:
            return False
        self.catalog, self._stamp = catalog, stamp
        log.info("catalog: %d models", len(catalog.entries))
        return True

    async def resolve(self, name: str) -> Entry | None:
        """The entry for `name`, looking again at the file before saying there is none:
        a model that appeared a moment ago is found."""
        entry = self.catalog.resolve(name)
        if entry is None and await asyncio.to_thread(self.refresh):
            entry = self.catalog.resolve(name)
        return entry

    async def follow(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.interval)
