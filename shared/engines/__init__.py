"""The engine adapter: the only code that knows whether llama-server's router or llama-swap
runs the models. Everything else asks it for a config, a command, and load/unload/list."""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.engines.base import Engine, EngineError
from shared.engines.llama_swap import LlamaSwap
from shared.engines.router import Router
from shared.files import write_if_possible
from shared.settings import Settings

__all__ = ["Engine", "EngineError", "choose", "make_engine"]
KINDS = ("router", "llama-swap")


def _choice_file(settings: Settings) -> Path:
    return settings.state_dir / "engine-choice"


def _by_path() -> str:
    return "llama-swap" if shutil.which("llama-swap") else "router"


def choose(settings: Settings) -> str:
    """At a stack start: ENGINE, `auto` resolved by this PATH and recorded, so that a `model`
    command run later from a shell with another PATH drives the engine the stack runs."""
    kind = _by_path() if settings.engine == "auto" else settings.engine
    write_if_possible(_choice_file(settings), kind)
    return kind


def make_engine(settings: Settings) -> Engine:
    kind = settings.engine
    if kind == "auto":
        try:
            kind = _choice_file(settings).read_text().strip()
        except OSError:
            kind = ""
        if kind not in KINDS:  # no stack started yet: what one would choose now
            kind = _by_path()
    return LlamaSwap(settings) if kind == "llama-swap" else Router(settings)
