"""A supervisord event listener: every process exit, expected or not, is appended to
STATE_DIR/logs/exits.jsonl, so `model status` can tell a process that keeps crashing from
one that runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from supervisor import childutils

from services.runner.config import logs_dir
from shared import settings as settings_mod


def exits_file(settings: settings_mod.Settings) -> Path:
    return logs_dir(settings) / "exits.jsonl"


def main() -> None:
    path = exits_file(settings_mod.load())
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        fields, _ = childutils.eventdata(payload + "\n")
        record = {"at": time.time(), "process": fields.get("processname"),
                  "event": headers.get("eventname"), "expected": fields.get("expected") == "1",
                  "pid": fields.get("pid")}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
