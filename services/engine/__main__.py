"""The engine process: bring the catalog and engine config up to date, then run the engine
(llama-server's router or llama-swap) as a child and sort its output (services/engine/
output.py).

The child is this service's own: it is stopped with it (SIGTERM is passed on; on Linux the
kernel also ends it if this process is killed outright), and a child that a killed engine
service left behind is stopped when the service starts again. Nothing else is ever stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import psutil

from services.engine.output import OutputRouter
from shared import logs
from shared import settings as settings_mod
from shared.engines import Engine, make_engine
from shared.files import write_if_possible
from shared.proxy_client import ProxyClient, ProxyError
from shared.settings import STOPPED_ALONE_ENV, Settings
from shared.sync import rebuild

log = logging.getLogger("model-serve.engine")
# the router's notes on exposing it to a network: it listens on loopback only, behind the proxy
QUIET = ("security: no API key is set", "security: router mode enabled")


def _die_with_parent(signum: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signum)  # PR_SET_PDEATHSIG


def _record(settings: Settings) -> Path:
    return settings.state_dir / "engine-child.json"


def stop_leftover(settings: Settings) -> None:
    """A child this service started before and that outlived it: the same pid and start
    time as recorded, so it is ours."""
    try:
        rec = json.loads(_record(settings).read_text())
        proc = psutil.Process(rec["pid"])
        # a zombie has already ended: waiting for its parent to reap it stops nothing
        if abs(proc.create_time() - rec["started"]) > 1 or \
                proc.status() == psutil.STATUS_ZOMBIE:
            return
    except (OSError, ValueError, KeyError, psutil.Error):
        return
    log.warning("stopping the engine (pid %d) that an earlier engine service left running",
                proc.pid)
    proc.terminate()
    try:
        proc.wait(15)
    except psutil.TimeoutExpired:
        proc.kill()


def hand_over(settings: Settings, engine: Engine, child: subprocess.Popen) -> None:
    """Before the engine stops its models: the proxy lets the requests under way finish and
    has the models' contexts saved (services/proxy/models/context_cache.py), then the child is
    stopped; requests that come meanwhile wait at the proxy until it has. Without a proxy
    (`model stop` stops it first) the child is stopped at once."""
    async def held() -> None:
        async with aiohttp.ClientSession() as session:
            proxy = ProxyClient(settings.proxy_url, session, settings.api_key, engine.key)
            with contextlib.suppress(ProxyError, aiohttp.ClientError, TimeoutError):
                async with proxy.engine_held(settings.drain_seconds, stop=True):
                    await asyncio.to_thread(end, child)
                    return
        end(child)

    asyncio.run(held())


def end(child: subprocess.Popen) -> None:
    # a supervisor that signals the whole group (honcho, Ctrl-C in a terminal) has reached
    # the child too, and a second signal would make it skip stopping its models gently: sent
    # only if needed. supervisord signals this process alone (STOPPED_ALONE_ENV): no wait.
    if os.environ.get(STOPPED_ALONE_ENV) != "1":
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(3)
    if child.poll() is None:
        child.terminate()
    child.wait()


def main() -> None:
    logs.setup("engine")
    settings = settings_mod.load()
    engine = make_engine(settings)
    try:
        rebuild(settings, engine)  # its notices are the sync service's to log
    except OSError as e:
        if not engine.config_path.is_file():
            sys.exit(f"engine: cannot write its config {engine.config_path}: {e}")
        # a full disk: serve what the last config says rather than nothing
        log.warning("cannot update the engine config (%s): starting with the last one", e)
    try:
        argv = engine.command()
    except FileNotFoundError as e:
        sys.exit(f"engine: {e}")
    stop_leftover(settings)
    log.info("starting %s on 127.0.0.1:%d", engine.name, settings.engine_port)
    child = subprocess.Popen(argv, env={**os.environ, **engine.environment()},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace",
                             preexec_fn=functools.partial(_die_with_parent, engine.death_signal))
    # on a full disk it goes unrecorded: Linux's death signal still stops it with us
    write_if_possible(_record(settings), json.dumps(
        {"pid": child.pid, "started": psutil.Process(child.pid).create_time()}))
    stopping = []

    def stop(signum, _frame) -> None:
        if stopping:
            return
        stopping.append(signum)
        threading.Thread(target=hand_over, args=(settings, engine, child), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    router = OutputRouter(settings.state_dir / "logs")
    for line in child.stdout:
        if not any(q in line for q in QUIET):
            router.feed(line)
    code = child.wait()
    _record(settings).unlink(missing_ok=True)
    if not stopping:
        log.error("%s exited with status %d; its output: %s", engine.name, code,
                  router.router.path)
    sys.exit(0 if stopping else code or 1)


if __name__ == "__main__":
    main()
