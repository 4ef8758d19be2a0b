"""One log format for every service: the wall-clock time, the process, the message. Lines
from several processes' logs then merge in time order (`model logs`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
log = logging.getLogger("model-serve")


def setup(process: str) -> None:
    logging.basicConfig(level=logging.INFO, datefmt=TIME_FORMAT,
                        format=f"%(asctime)s.%(msecs)03d {process}: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file


class LogFile:
    """Lines appended to a file the service writes itself, moved to <name>.1 past `max_bytes`
    (0: never). A line that cannot be written (a full disk) is dropped: logs are never worth
    a service, and a full STATE_DIR must not stop serving. The first lost line says so, once;
    the first line written again says how many were lost, in the service's log and, with
    `mark_losses`, in the file where they are missing."""

    def __init__(self, path: Path, max_bytes: int = 0, mark_losses: bool = True) -> None:
        self.path, self.max_bytes, self.mark_losses = path, max_bytes, mark_losses
        self.file: BinaryIO | None = None
        self.dropped = 0

    def write(self, text: str) -> None:
        line = f"{text}\n".encode(errors="replace")
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # unbuffered: a line that failed is gone, not held to fail again
                self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives with us
            lost = f"[{self.dropped} line(s) lost here: the disk was full or unwritable]\n"
            self.file.write((lost.encode() if self.dropped and self.mark_losses else b"")
                            + line)
        except OSError as e:
            if not self.dropped:
                log.warning("cannot write %s (%s): its lines are dropped until it can",
                            self.path, e.strerror or e)
            self.dropped += 1
            return
        if self.dropped:
            log.warning("writing %s again (%d line(s) were dropped)", self.path, self.dropped)
            self.dropped = 0
        if self.max_bytes and self.file.tell() > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self.file is not None
        self.file.close()
        self.file = None  # reopened by the next line
        try:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        except OSError as e:
            log.warning("cannot rotate %s (%s)", self.path, e.strerror or e)

    def tail(self, lines: int = 5) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []
