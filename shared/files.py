"""Small file helpers shared by the services."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("model-serve")
_failing: set[Path] = set()  # files whose last write failed: said once, until one succeeds


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_atomic(path, text)
    return True


def write_if_possible(path: Path, text: str) -> bool:
    """write_if_changed for a file the stack can do without for a while (a cache, a record
    it rebuilds): when it cannot be written (a full disk) the old one stays, a warning says
    so once, and no service stops for it. True when written."""
    try:
        changed = write_if_changed(path, text)
    except OSError as e:
        if path not in _failing:
            log.warning("cannot write %s (%s): the old one is kept", path, e.strerror or e)
        _failing.add(path)
        return False
    _failing.discard(path)
    return changed
