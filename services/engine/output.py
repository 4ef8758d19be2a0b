"""The engine's output, sorted for people: each model's llama-server lines go to a log file
of its own (STATE_DIR/logs/models/<name>.log), the router's own lines to logs/router.log, and
the engine service's log gets one line per model start and stop, a pointer to the model's log
when one fails, and the router's warnings and errors. A full disk drops lines (shared/logs.py),
never the engine."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from shared.logs import TIME_FORMAT, LogFile

log = logging.getLogger("model-serve.engine")
MAX_BYTES = 10 * 1024**2  # a log this big is moved to <name>.log.1 and started again

_CHILD = re.compile(r"^\[(\d+)\] ?(.*)$")  # the router prefixes a model's lines with its port
_SPAWN = re.compile(r"spawning server instance with name=(\S+) on port (\d+)")
_EXIT = re.compile(r"instance name=(\S+) exited with status (-?\d+)")
_LEVEL = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWED]) +(.*)$")


class StampedLog(LogFile):
    """A log of the engine's output: each line after the time, as the services log."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, MAX_BYTES)

    def write(self, text: str) -> None:
        super().write(f"{time.strftime(TIME_FORMAT)} {text}")


class OutputRouter:
    def __init__(self, logs_dir: Path) -> None:
        self.models_dir = logs_dir / "models"
        self.router = StampedLog(logs_dir / "router.log")
        self.ports: dict[str, str] = {}  # port → model (the router's name for it)
        self.files: dict[str, StampedLog] = {}

    def model_log(self, name: str) -> StampedLog:
        if name not in self.files:
            self.files[name] = StampedLog(self.models_dir / f"{name}.log")
        return self.files[name]

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        child = _CHILD.match(line)
        if child and child.group(1) in self.ports:
            self.model_log(self.ports[child.group(1)]).write(child.group(2))
            return
        self.router.write(line)
        if spawn := _SPAWN.search(line):
            name, port = spawn.groups()
            self.ports[port] = name
            log.info("starting %s on port %s; its log: %s", name, port,
                     self.model_log(name).path)
        elif ended := _EXIT.search(line):
            name, status = ended.groups()
            self.ports = {p: n for p, n in self.ports.items() if n != name}
            if status == "0":
                log.info("%s stopped", name)
            else:
                last = self.model_log(name).tail(3)
                log.warning("%s exited with status %s; its log: %s%s", name, status,
                            self.model_log(name).path,
                            "".join(f"\n    {x}" for x in last))
        elif (level := _LEVEL.match(line)) and level.group(1) in "WE":
            log.warning("llama-server: %s", level.group(2))
        elif not _LEVEL.match(line) and not child and line.strip():
            log.info("%s", line)  # not llama-server's format: llama-swap, or a fatal error
