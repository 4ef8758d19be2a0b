"""One writer at a time: an exclusive lock on a file, waited for."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """flock: the OS releases it when its holder exits or dies, so a crash never leaves it
    taken. Per open file, so two threads of one process exclude each other too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
