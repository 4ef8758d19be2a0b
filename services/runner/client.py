"""supervisord's XML-RPC API over its unix socket: process states, restart, shutdown."""

from __future__ import annotations

import xmlrpc.client

from services.runner.config import socket_path
from shared.settings import Settings

RUNNING_STATES = ("RUNNING",)


def connect(settings: Settings) -> xmlrpc.client.ServerProxy:
    from supervisor.xmlrpc import SupervisorTransport  # slow to import; not every command asks

    transport = SupervisorTransport(None, None, f"unix://{socket_path(settings)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def processes(settings: Settings) -> list[dict] | None:
    """Every program's info (name, statename, pid, start, now, ...); None when no
    supervisord of ours answers."""
    try:
        return [p for p in connect(settings).supervisor.getAllProcessInfo()
                if p["name"] != "exits"]
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return None
