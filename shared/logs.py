"""One log format for every service: the wall-clock time, the process, the message. Lines
from several processes' logs then merge in time order (`model logs`)."""

from __future__ import annotations

import logging

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup(process: str) -> None:
    logging.basicConfig(level=logging.INFO, datefmt=TIME_FORMAT,
                        format=f"%(asctime)s.%(msecs)03d {process}: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file
