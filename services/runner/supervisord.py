"""supervisord as `model supervise` runs it: supervisor's own program, made to outlive a
full disk.

supervisord writes its log and every process's output to files in STATE_DIR/logs. When a
write fails, supervisor's loggers print the error to supervisord's stderr, which under
`model start` is STATE_DIR/logs/supervise.out, on the same full disk: that print raises in
supervisord's main loop and ends it, and with it every restart of every process. Here a line
that cannot be written is dropped instead (said on stderr at most once a minute per file,
where stderr can take it), and a log whose rotation failed halfway is opened again, so the
next line can be written once there is room.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

from supervisor import loggers
from supervisor.supervisord import main as supervisord_main

NOTE_EVERY = 60.0  # seconds between two notes on the same file's lost lines


def _note(handler: loggers.Handler, error: BaseException | None) -> None:
    now = time.monotonic()
    if now - getattr(handler, "noted_at", -NOTE_EVERY) < NOTE_EVERY:
        return
    handler.noted_at = now  # type: ignore[attr-defined]
    name = getattr(handler, "baseFilename", "its output")
    with contextlib.suppress(Exception):  # stderr may be on the full disk too
        sys.stderr.write(f"supervisord: cannot write {name} ({error}): lines are dropped\n")
        sys.stderr.flush()


def _drop_line(handler: loggers.Handler) -> None:
    """Handler.handleError: called from the `except` of a failed write."""
    _note(handler, sys.exc_info()[1])


def _tolerant(rollover: Callable[[loggers.RotatingFileHandler], None]) \
        -> Callable[[loggers.RotatingFileHandler], None]:
    """RotatingFileHandler.doRollover, which supervisor calls outside its `try`."""

    def do_rollover(handler: loggers.RotatingFileHandler) -> None:
        try:
            rollover(handler)
        except (OSError, ValueError) as e:  # ValueError: the stream is already closed
            _note(handler, e)
            if handler.stream.closed:
                with contextlib.suppress(OSError):
                    handler.stream = open(handler.baseFilename, "ab")  # noqa: SIM115

    return do_rollover


def main() -> None:
    loggers.Handler.handleError = _drop_line  # type: ignore[method-assign]
    loggers.RotatingFileHandler.doRollover = _tolerant(  # type: ignore[method-assign]
        loggers.RotatingFileHandler.doRollover)
    supervisord_main()


if __name__ == "__main__":
    main()
