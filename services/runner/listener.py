"""A supervisord event listener. Every process exit, expected or not, is appended to
STATE_DIR/logs/exits.jsonl, so `model status` can tell a process that keeps crashing from
one that runs. A process supervisord gave up on (FATAL: it kept failing at start) is started
again every RETRY_FATAL seconds: what made it fail may pass by itself (a full disk, a port
held for a while), and the stack then heals without anyone running `model restart`."""

from __future__ import annotations

import json
import logging
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor import childutils

from services.runner import client
from services.runner.config import logs_dir
from shared import logs
from shared import settings as settings_mod

log = logging.getLogger("model-serve.runner")
RETRY_FATAL = 15  # seconds


def exits_file(settings: settings_mod.Settings) -> Path:
    return logs_dir(settings) / "exits.jsonl"


def retry_given_up(server: xmlrpc.client.ServerProxy, retried: dict[str, float]) -> None:
    """Start again each process that has been FATAL for RETRY_FATAL seconds."""
    now = time.time()
    try:
        for p in server.supervisor.getAllProcessInfo():
            name = p["name"]
            if p["statename"] != "FATAL" or \
                    now - max(p["stop"], retried.get(name, 0)) < RETRY_FATAL:
                continue
            log.info("%s had given up starting: trying again", name)
            retried[name] = now
            server.supervisor.startProcess(name, False)  # not waiting: events queue meanwhile
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError) as e:
        log.warning("cannot ask supervisord to start what gave up: %s", e)


def main() -> None:
    logs.setup("exits")
    settings = settings_mod.load()
    # a full disk loses records, not the listener; only records in the file (JSON lines)
    exits = logs.LogFile(exits_file(settings), mark_losses=False)
    server = client.connect(settings)
    retried: dict[str, float] = {}
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers["eventname"].startswith("TICK"):
            retry_given_up(server, retried)
        else:
            fields, _ = childutils.eventdata(payload + "\n")
            exits.write(json.dumps({
                "at": time.time(), "process": fields.get("processname"),
                "event": headers.get("eventname"), "expected": fields.get("expected") == "1",
                "pid": fields.get("pid")}))
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
