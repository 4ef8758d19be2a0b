"""What the proxy knows between requests: the current catalog and each model's use."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from shared.catalog import Catalog
from shared.settings import Settings
from shared.sync import load_last_good

log = logging.getLogger("model-serve.proxy")


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

    async def follow(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.interval)


@dataclass
class ModelUse:
    in_flight: int = 0
    last_used: float = 0.0
    requests: int = 0


class Usage:
    """Per-model in-flight count and last use: the proxy sees every request, so it is the
    one place these are true; the governor reads them from here."""

    def __init__(self) -> None:
        self.models: dict[str, ModelUse] = {}

    def start(self, model_id: str) -> None:
        use = self.models.setdefault(model_id, ModelUse())
        use.in_flight += 1
        use.requests += 1
        use.last_used = time.time()

    def finish(self, model_id: str) -> None:
        use = self.models[model_id]
        use.in_flight -= 1
        use.last_used = time.time()
