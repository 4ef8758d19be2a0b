"""The real llama-swap and Ollama, for the tests that need them: by setting (REAL_LLAMA_SWAP,
REAL_OLLAMA), on PATH (Homebrew's on a Mac), or the builds in ../shared/tools/real-engines
beside the checkout (CI always has those). A test that finds none skips, saying where it
looked."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness import ROOT

SHARED = ROOT.parent / "shared" / "tools" / "real-engines"
_BREW = (Path("/opt/homebrew/bin"), Path("/usr/local/bin"))


def find(name: str, setting: str, shipped: Path) -> Path | None:
    """The setting decides when given (`REAL_OLLAMA=none` runs without the real Ollama)."""
    given = os.environ.get(setting)
    if given:
        return Path(given) if os.access(given, os.X_OK) else None
    for found in (shutil.which(name), *(d / name for d in _BREW), shipped):
        if found and os.access(found, os.X_OK):
            return Path(found)
    return None


ENGINES = {"llama-swap": ("REAL_LLAMA_SWAP", SHARED / "llama-swap"),
           "ollama": ("REAL_OLLAMA", SHARED / "ollama" / "ollama")}


def which() -> str:
    """The real engines this run uses, for the end of its output."""
    found = {name: find(name, setting, shipped)
             for name, (setting, shipped) in ENGINES.items()}
    return "real engines: " + "; ".join(
        f"{name} {path}" if path else f"{name} not found (its tests skip)"
        for name, path in found.items())


def llama_swap() -> Path:
    """The real llama-swap's executable, or the test skips."""
    found = find("llama-swap", *ENGINES["llama-swap"])
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


def ollama() -> Path:
    """The real Ollama's executable, runnable (see runnable_copy), or the test skips."""
    found = find("ollama", *ENGINES["ollama"])
    if found is None:
        given = os.environ.get("REAL_OLLAMA")
        pytest.skip(f"REAL_OLLAMA={given} is no executable" if given else
                    f"no real Ollama: set REAL_OLLAMA, put `ollama` on PATH, or have {SHARED}")
    return runnable_copy(found)


def _link_target(path: Path) -> str | None:
    """The sibling a flattened symlink names: a file under 64 bytes whose whole content is
    the name of another file in the same folder."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size >= 64:
        return None
    try:
        name = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    ok = name and "/" not in name and name != path.name and (path.parent / name).is_file()
    return name if ok else None


def runnable_copy(exe: Path) -> Path:
    """`exe` itself, unless the libraries beside it (lib/ollama) are symlinks flattened into
    small files naming their targets, as in the shared copy, which then cannot start its
    runners ("exit status 127"). Then: a copy with those files made links again, made once
    per version of the source in ~/.cache/model-serve, and its executable."""
    root = exe.resolve().parent
    files = sorted(p for p in root.rglob("*") if not p.is_dir())
    if not any(_link_target(p) for p in files):
        return exe
    stamp = hashlib.sha256()
    for p in files:
        st = p.stat()
        stamp.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    cache = Path.home() / ".cache" / "model-serve"
    done = cache / f"real-ollama-{stamp.hexdigest()[:16]}"
    if not done.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="real-ollama-", dir=cache))
        for src in sorted(root.rglob("*")):
            dst = work / src.relative_to(root)
            if src.is_dir():
                dst.mkdir()
            elif target := _link_target(src):
                dst.symlink_to(target)
            else:
                shutil.copy2(src, dst)
        try:
            work.rename(done)
        except OSError:  # another test process made it meanwhile
            shutil.rmtree(work)
    return done / exe.resolve().relative_to(root)
