"""The engine adapter: the only code that knows whether llama-server's router or llama-swap
runs the models. Everything else asks it for a config, a command, and load/unload/list."""

from __future__ import annotations

import shutil

from shared.engines.base import Engine, EngineError
from shared.engines.llama_swap import LlamaSwap
from shared.engines.router import Router
from shared.settings import Settings

__all__ = ["Engine", "EngineError", "make_engine"]


def make_engine(settings: Settings) -> Engine:
    kind = settings.engine
    if kind == "auto":
        kind = "llama-swap" if shutil.which("llama-swap") else "router"
    return LlamaSwap(settings) if kind == "llama-swap" else Router(settings)
