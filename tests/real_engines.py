"""The real llama-swap and Ollama, for the tests that need them: by setting (REAL_LLAMA_SWAP,
REAL_OLLAMA), on PATH (Homebrew's on a Mac), or the builds in ../shared/tools/real-engines
beside the checkout (CI always has those). A test that finds none skips, saying where it
looked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.harness import ROOT

SHARED = ROOT.parent / "shared" / "tools" / "real-engines"
_BREW = (Path("/opt/homebrew/bin"), Path("/usr/local/bin"))


def find(name: str, setting: str, shipped: Path) -> Path | None:
    given = os.environ.get(setting)
    if given:
        return Path(given)
    for found in (shutil.which(name), *(d / name for d in _BREW), shipped):
        if found and os.access(found, os.X_OK):
            return Path(found)
    return None


def llama_swap() -> Path:
    """The real llama-swap's executable, or the test skips."""
    found = find("llama-swap", "REAL_LLAMA_SWAP", SHARED / "llama-swap")
    if found is None:
        pytest.skip(f"no real llama-swap: set REAL_LLAMA_SWAP, put it on PATH, or have "
                    f"{SHARED}")
    return found


def llama_swap_bin_dir(tmp: Path) -> Path:
    """A PATH folder whose `llama-swap` is the real one."""
    folder = tmp / "real-swap-bin"
    folder.mkdir(exist_ok=True)
    link = folder / "llama-swap"
    if not link.exists():
        link.symlink_to(llama_swap())
    return folder
