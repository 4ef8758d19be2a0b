"""Where the llama-server binary is: LLAMA_SERVER, then PATH, then the cached build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from shared.settings import ROOT, Settings

BUILD_SCRIPT = ROOT / "services/engine/build_llama_server.sh"
BUILT_VERSION = "11434.0.0"


def built_path() -> Path:
    cache = Path(os.environ.get("LLAMA_BUILD_CACHE", Path.home() / ".cache/model-serve"))
    return cache / f"llama-server-{BUILT_VERSION}/bin/llama-server"


def find_llama_server(settings: Settings) -> str:
    if settings.llama_server:
        return settings.llama_server
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    built = built_path()
    if built.is_file():
        return str(built)
    raise FileNotFoundError(
        f"llama-server not found: not on PATH and not built at {built}; "
        "run `make install` (or set LLAMA_SERVER)")
