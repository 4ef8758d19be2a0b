"""Whether STATE_DIR takes writes. On a full filesystem the stack serves on, but log lines are
dropped and caches and records go unsaved until there is room: /health warns, `model doctor`
says which folder and what in it takes the room."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.settings import Settings

FULL_BYTES = 1024**2  # less free room than this: full (a log line may not fit)


def size(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n // 1024} KiB"


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_BYTES
    except OSError:
        return False


def state_dir_problem(settings: Settings) -> str | None:
    """Why STATE_DIR cannot take writes now, None when it can. Blocking: a write there."""
    folder = settings.state_dir
    try:
        usage = shutil.disk_usage(folder)
        if usage.free < FULL_BYTES:
            return (f"STATE_DIR {folder} is on a full filesystem ({mount_point(folder)}: "
                    f"{size(usage.free)} free of {size(usage.total)}): log lines are dropped "
                    "and state is not saved until there is room")
        with tempfile.TemporaryFile(dir=folder) as probe:  # room is not all it takes
            probe.write(b"probe")
            probe.flush()
    except OSError as e:
        return f"STATE_DIR {folder} cannot be written ({e.strerror or e}): log lines are dropped"
    return None


def _room(path: Path) -> int:
    """Bytes `path` takes (a folder: all it holds), never following links."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        return sum(_room(p) for p in path.iterdir())
    except OSError:
        return 0


def biggest(folder: Path, count: int = 3) -> list[tuple[str, int]]:
    """The entries of `folder` that take the most room, largest first."""
    try:
        sizes = [(p.name + ("/" if p.is_dir() else ""), _room(p)) for p in folder.iterdir()]
    except OSError:
        return []
    return sorted(sizes, key=lambda s: -s[1])[:count]
