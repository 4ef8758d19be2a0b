"""The processes of one stack, found without its supervisord (after it died, they live on,
holding their ports). `model supervise` puts the stack's instance id in supervisord's
environment, and every process of the stack inherits it: the services, the exits listener,
the engine's llama-servers. A process without it, or with another stack's, is never touched:
another model-serve stack, a llama-server the user runs, anything else on the machine."""

from __future__ import annotations

import os

import psutil

from shared.settings import INSTANCE_ENV


def find(instance: str) -> list[psutil.Process]:
    """Every live process of the stack `instance` (processes of other users go unread)."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(INSTANCE_ENV) == instance and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return out


def name(proc: psutil.Process) -> str:
    """A service's Procfile name (`python -m services.proxy`: proxy; the exits listener's,
    supervisord's), else the program's."""
    try:
        cmd = proc.cmdline()
        return next((cmd[i + 1].rsplit(".", 1)[-1] for i, arg in enumerate(cmd[:-1])
                     if arg == "-m" and cmd[i + 1].startswith("services.")), proc.name())
    except psutil.Error:
        return f"pid {proc.pid}"


def describe(procs: list[psutil.Process]) -> str:
    return ", ".join(f"{name(p)} (pid {p.pid})" for p in procs)


def stop(procs: list[psutil.Process], wait: float) -> None:
    """As supervisord stops them: SIGTERM to each process whose parent is not one of them
    (the engine stops its own llama-servers, the proxy finishes its streams), then, after up
    to `wait` seconds, SIGKILL to whatever is left."""
    pids = {p.pid for p in procs}
    tops = []
    for proc in procs:
        try:
            if proc.ppid() not in pids:
                proc.terminate()
                tops.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(tops, wait)
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(procs, 5)
