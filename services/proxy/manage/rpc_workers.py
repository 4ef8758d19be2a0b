"""The RPC workers the catalog's models name (custom_models.yaml `rpc:`): /running's
`rpc_workers` (which /metrics shows too)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import psutil

from shared.catalog import Catalog
from shared.rpc import DEFAULT_PORT, NAMES, is_loopback, parse_address, reachable


def named(catalog: Catalog) -> dict[str, list[str]]:
    """Each worker address → the ids of the models that use it, in the catalog's order."""
    out: dict[str, list[str]] = {}
    for entry in catalog.entries.values():
        if entry.backend == "engine":
            for address in entry.rpc:
                out.setdefault(address, []).append(entry.id)
    return out


def _own_addresses() -> set[str]:
    out = {socket.gethostname(), "localhost"}
    with contextlib.suppress(OSError):
        for addrs in psutil.net_if_addrs().values():
            out.update(a.address.split("%")[0] for a in addrs)
    return out


def _listen(cmdline: list[str]) -> tuple[str, int]:
    """The host and port an rpc-server command line listens on (its defaults without)."""
    host, port = "127.0.0.1", DEFAULT_PORT
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag in ("-p", "--port") and value.isdigit():
            port = int(value)
        elif flag in ("-H", "--host"):
            host = value
    return host, port


def _rpc_servers() -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, IndexError):
            if os.path.basename((proc.info["cmdline"] or [""])[0]) in NAMES:
                out.append(proc)
    return out


def local_workers() -> dict[int, int]:
    """Port → resident memory of each rpc-server process on this machine."""
    out: dict[int, int] = {}
    for proc in _rpc_servers():
        with contextlib.suppress(psutil.Error):
            out[_listen(proc.info["cmdline"])[1]] = proc.memory_info().rss
    return out


def local_workers_listening() -> list[str]:
    """host:port of each rpc-server process on this machine, as its command line has it."""
    out = []
    for proc in _rpc_servers():
        host, port = _listen(proc.info["cmdline"])
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


def _rows(catalog: Catalog, loaded: set[str]) -> list[dict]:
    workers = named(catalog)
    if not workers:
        return []
    local = local_workers()
    mine = _own_addresses()
    rows = []
    for address, models in workers.items():
        host, port = parse_address(address)
        here = is_loopback(host) or host.strip("[]") in mine
        in_use = [m for m in models if m in loaded]
        # rpc-server serves one client at a time and queues one more (listen backlog 1): a
        # worker a loaded model holds is up, and a probe would only wait in its queue
        up = bool(in_use) or reachable(address, 1.0)
        rows.append({"address": address, "up": up, "models": models, "in_use_by": in_use,
                     "on_this_machine": here,
                     # its process's memory: only where it runs here
                     "memory": local.get(port) if here else None})
    return rows


async def rpc_workers(catalog: Catalog, models: list[dict]) -> list[dict]:
    """/running's `rpc_workers`: each worker's address, whether it is up (held by a loaded
    model, or accepting a connection within a second), the models that name it and the
    loaded ones that hold it, and its memory when it runs on this machine. `models`:
    /running's model rows."""
    loaded = {m["id"] for m in models if m.get("state") in ("loaded", "loading", "unloading")}
    return await asyncio.to_thread(_rows, catalog, loaded)
