"""Each model's use, as the proxy sees every request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


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
        # told when a model's last request ends: a load waiting for room may go on
        self.on_idle: Callable[[], None] = lambda: None

    def start(self, model_id: str) -> None:
        use = self.models.setdefault(model_id, ModelUse())
        use.in_flight += 1
        use.requests += 1
        use.last_used = time.time()

    def finish(self, model_id: str) -> None:
        use = self.models[model_id]
        use.in_flight -= 1
        use.last_used = time.time()
        if not use.in_flight:
            self.on_idle()

    def touch(self, model_id: str, only_if_unseen: bool = False) -> float:
        """A load counts as a use, and so does the first sight of a model loaded elsewhere
        (`model load`, a restart, Ollama loading it for another client), so the minimum
        age protects it too. Returns the last use."""
        use = self.models.setdefault(model_id, ModelUse())
        if not (only_if_unseen and use.last_used):
            use.last_used = time.time()
        return use.last_used
