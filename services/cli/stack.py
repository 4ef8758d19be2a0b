"""Start, stop and inspect the Procfile stack run in the background by honcho.

The pid file records honcho's pid and start time, so `stop` signals only the process
group this command started, never a stranger that reused the pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import psutil

from services.cli.common import load_settings
from shared.settings import ROOT, Settings


def pid_file(settings: Settings) -> Path:
    return settings.state_dir / "stack.pid"


def log_file(settings: Settings) -> Path:
    return settings.state_dir / "stack.log"


def running_stack(settings: Settings) -> psutil.Process | None:
    try:
        record = json.loads(pid_file(settings).read_text())
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["started"]) < 1 and proc.is_running():
            return proc
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def get_health(settings: Settings, timeout: float = 3) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(settings.proxy_url + "/health", timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}
    except (OSError, ValueError):
        return None


@click.command()
@click.option("--wait", default=120, show_default=True, help="Seconds to wait for /health.")
def start(wait: int) -> None:
    """Start the stack in the background; returns once /health answers."""
    settings = load_settings()
    if running_stack(settings):
        click.echo(f"already running (pid file {pid_file(settings)})")
        return
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    with open(log_file(settings), "ab") as log:
        proc = subprocess.Popen(
            [os.path.join(bindir, "honcho"), "start", "-f", str(ROOT / "Procfile"),
             "-d", str(ROOT), "--no-prefix"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True)
    started = psutil.Process(proc.pid).create_time()
    pid_file(settings).write_text(json.dumps({"pid": proc.pid, "started": started}))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file(settings).unlink(missing_ok=True)
            raise click.ClickException(
                f"the stack exited (code {proc.returncode}); see {log_file(settings)}:\n"
                + _tail(log_file(settings)))
        health = get_health(settings, timeout=1)
        if health and health[0] == 200:
            click.echo(f"model-serve is up on {settings.proxy_url} "
                       f"({health[1].get('models', 0)} models); logs: {log_file(settings)}")
            return
        time.sleep(0.3)
    raise click.ClickException(f"/health did not answer within {wait}s; see "
                               f"{log_file(settings)}, stop with `model stop`")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@click.command()
def stop() -> None:
    """Stop exactly the stack that `model start` (or `make up`) started."""
    settings = load_settings()
    proc = running_stack(settings)
    if proc is None:
        pid_file(settings).unlink(missing_ok=True)
        click.echo("not running")
        return
    group = [proc, *proc.children(recursive=True)]
    os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(group, timeout=20)
    for p in alive:
        p.kill()
    pid_file(settings).unlink(missing_ok=True)
    click.echo("stopped")


@click.command()
def status() -> None:
    """Whether the stack runs, and what its /health says."""
    settings = load_settings()
    proc = running_stack(settings)
    click.echo(f"stack: running, pid {proc.pid}" if proc else "stack: not started by model start")
    health = get_health(settings)
    if health is None:
        click.echo(f"proxy: not answering on {settings.proxy_url}")
        raise SystemExit(1)
    code, body = health
    engine = body.get("engine", {})
    click.echo(f"proxy: {settings.proxy_url} ({body.get('status')}), "
               f"{body.get('models', 0)} models")
    click.echo(f"engine: {engine.get('name')} at {engine.get('url')}: "
               f"{'up' if engine.get('ok') else 'DOWN'}; loaded: "
               f"{', '.join(engine.get('loaded', [])) or 'none'}")
    governor = body.get("governor") or {}
    if governor:
        click.echo(f"governor: {governor.get('url')}: {governor.get('status')}"
                   + (f" ({governor['problem']})" if governor.get("problem") else ""))
    if code != 200:
        raise SystemExit(1)
