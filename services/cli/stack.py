"""Start, stop, restart and inspect the stack, which supervisord runs (services/runner).

`model supervise` runs supervisord in the foreground (the launchd/systemd service runs it);
`model start` runs that in the background and waits until the stack's own proxy answers.
STATE_DIR/instance.json records supervisord's pid, start time and the stack's instance id,
so `stop` signals only the supervisord this command started and `start`/`status` never take
another stack's /health for this one's. Should that supervisord be gone, the processes it
left are found by the instance id (services/runner/members.py): `stop` stops them, `status`
names them, `start` and `supervise` replace them.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path

import click
import psutil

from services.cli.common import load_settings, tail
from services.runner import client, config, members
from services.runner.listener import RETRY_FATAL, exits_file
from shared.engine_key import new_key
from shared.engines import choose
from shared.files import write_atomic, write_if_changed
from shared.settings import INSTANCE_ENV, Settings

PORTS = (("HARMONY_PROXY_PORT", "proxy_port"), ("LLAMA_SWAP_PORT", "engine_port"),
         ("GOVERNOR_PORT", "governor_port"))


def instance_file(settings: Settings) -> Path:
    return settings.state_dir / "instance.json"


def recorded(settings: Settings) -> dict | None:
    try:
        return json.loads(instance_file(settings).read_text())
    except (OSError, ValueError):
        return None


def running_stack(settings: Settings) -> psutil.Process | None:
    """The supervisord this stack's `model supervise` became, if it still runs."""
    rec = recorded(settings)
    try:
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["started"]) < 1 and proc.is_running() \
                and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (TypeError, KeyError, psutil.Error):
        pass
    return None


def leftovers(settings: Settings) -> list[psutil.Process]:
    """What the recorded stack left running when its supervisord is gone (nothing while it
    runs)."""
    rec = recorded(settings)
    if not rec or not rec.get("instance") or running_stack(settings):
        return []
    return members.find(rec["instance"])


def _stop_leftovers(settings: Settings, procs: list[psutil.Process]) -> None:
    members.stop(procs, max(config.stop_wait(settings, members.name(p)) for p in procs))


def _replace_leftovers(settings: Settings) -> None:
    """Before a start: what the last stack left running holds the ports the new one needs."""
    if left := leftovers(settings):
        click.echo(f"stopping what the last stack left running when its supervisord died: "
                   f"{members.describe(left)}")
        _stop_leftovers(settings, left)


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


def _peer_lines(settings: Settings) -> None:
    """One line per peer (/running's): its state and how many of its models are served."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    request = urllib.request.Request(settings.proxy_url + "/running", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            peers = json.loads(r.read()).get("peers") or []
    except (OSError, ValueError, AttributeError):
        return
    for p in peers:
        state = p.get("state") or ("up" if p.get("up") else "down")
        why = f" ({p['error']})" if p.get("error") else ""
        click.echo(f"peer {p.get('name')} ({p.get('kind')}, {p.get('url')}): {state}, "
                   f"{len(p.get('models') or [])} model(s){why}")


def ours(settings: Settings, health: tuple[int, dict] | None) -> bool:
    rec = recorded(settings)
    return bool(health and rec and health[1].get("instance") == rec.get("instance"))


def port_holder(host: str, port: int) -> str | None:
    """None when the port is free; otherwise who holds it, as far as we may see."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                    and conn.pid:
                cmd = " ".join(psutil.Process(conn.pid).cmdline())
                return f"pid {conn.pid} ({cmd[:100]})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def taken_ports(settings: Settings) -> list[str]:
    out = []
    for key, attr in PORTS:
        port = getattr(settings, attr)
        host = settings.listen_host if attr == "proxy_port" else "127.0.0.1"
        if holder := port_holder(host, port):
            out.append(f"port {port} ({key}) is taken by {holder}")
    return out


@click.command()
def supervise() -> None:
    """Run the stack in the foreground under supervisord (the installed service runs this)."""
    settings = load_settings()
    _replace_leftovers(settings)
    config.logs_dir(settings).mkdir(parents=True, exist_ok=True)
    write_if_changed(config.conf_path(settings), config.render(settings))
    bindir = Path(sys.executable).parent
    instance = secrets.token_hex(8)
    new_key(settings)  # the previous stack's engine key stops working
    write_atomic(instance_file(settings), json.dumps({
        "instance": instance, "pid": os.getpid(), "started": psutil.Process().create_time()}))
    env = {**os.environ, INSTANCE_ENV: instance, "PYTHONUNBUFFERED": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "ENGINE": choose(settings)}
    os.execve(sys.executable, [sys.executable, "-m", "services.runner.supervisord", "-c",
                               str(config.conf_path(settings))], env)


def command_lines() -> list[str]:
    """How to reach the `model` command, which lives in the virtualenv (`make up` prints
    these last): its path, and the line that puts it on PATH for a shell. Nothing is written
    anywhere: the user's shell profile is the user's."""
    bindir = Path(sys.executable).parent
    model = bindir / "model"
    try:
        short = f" (from the checkout: {model.relative_to(config.PROCFILE.parent)})"
    except ValueError:
        short = ""
    return [f"the model command: {model}{short}",
            f'  for this shell: export PATH="{bindir}:$PATH"   (or: source {bindir}/activate)',
            "  add that line to your shell's profile to keep it; then `model doctor` checks "
            "the setup"]


def _fail_start(settings: Settings, proc: subprocess.Popen, why: str) -> None:
    if proc.poll() is None:
        _shutdown(settings, psutil.Process(proc.pid))
    instance_file(settings).unlink(missing_ok=True)
    raise click.ClickException(why)


@click.command()
@click.option("--wait", default=120, show_default=True, help="Seconds to wait for /health.")
@click.option("--quiet", is_flag=True, help="Say nothing when it is already running (cron).")
def start(wait: int, quiet: bool) -> None:
    """Start the stack in the background; returns once its own proxy answers."""
    settings = load_settings()
    if running_stack(settings):
        if not quiet:
            click.echo(f"already running (see `model status`; logs: "
                       f"{config.logs_dir(settings)})")
            click.echo("\n".join(command_lines()))
        return
    _replace_leftovers(settings)
    if taken := taken_ports(settings):
        raise click.ClickException("cannot start: " + "; ".join(taken) +
                                   " (stop it, or set the port in .env)")
    logs = config.logs_dir(settings)
    logs.mkdir(parents=True, exist_ok=True)
    instance_file(settings).unlink(missing_ok=True)
    with open(logs / "supervise.out", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "supervise"],
                                cwd=config.PROCFILE.parent, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail_start(settings, proc, f"the stack exited (code {proc.returncode}):\n"
                        + tail(logs / "supervise.out") + "\n" + tail(logs / "supervisord.log"))
        infos = client.processes(settings) or []
        for p in infos:
            if p["statename"] == "FATAL":
                _fail_start(settings, proc, f"{p['name']} could not start; the last lines of "
                            f"{config.log_file(settings, p['name'])}:\n"
                            + tail(config.log_file(settings, p["name"])))
        health = get_health(settings, timeout=1)
        started = bool(infos) and all(p["statename"] == "RUNNING" for p in infos)
        if started and health and health[0] == 200 and ours(settings, health):
            click.echo(f"model-serve is up on {settings.proxy_url} "
                       f"({health[1].get('models', 0)} models); logs: {logs}")
            click.echo("\n".join(command_lines()))
            return
        time.sleep(0.3)
    raise click.ClickException(f"/health did not answer within {wait}s; see `model status` "
                               f"and {logs}; stop with `model stop`")


def _shutdown(settings: Settings, proc: psutil.Process) -> None:
    """supervisord stops every process it runs (the proxy finishing its streams), then
    itself."""
    try:
        client.connect(settings).supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        proc.terminate()
    try:
        proc.wait(120)
    except psutil.TimeoutExpired:
        proc.kill()


@click.command()
def stop() -> None:
    """Stop exactly the stack that `model start` (or `make up`, or the service) started,
    also what is left of it when its supervisord is gone."""
    settings = load_settings()
    proc = running_stack(settings)
    if proc is not None:
        _shutdown(settings, proc)
    left = leftovers(settings)  # after a shutdown: what outlived it, if anything
    named = members.describe(left)  # while they still run: their names are read from them
    if left:
        _stop_leftovers(settings, left)
    instance_file(settings).unlink(missing_ok=True)
    if proc is None and left:
        click.echo(f"stopped what was left of the stack (its supervisord was gone): {named}")
    else:
        click.echo("stopped" if proc else "not running")


def _states(server, names: list[str]) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in server.getAllProcessInfo() if p["name"] in names}


def _until(server, names: list[str], done: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Each of `names` in one of the `done` states, or the timeout; the states then."""
    deadline = time.monotonic() + timeout
    while True:
        states = _states(server, names)
        if all(states.get(n) in done for n in names) or time.monotonic() >= deadline:
            return states
        time.sleep(0.05)


STOPPED = ("STOPPED", "EXITED", "FATAL")


def _stop_together(settings: Settings, server, names: list[str]) -> None:
    """Ask supervisord to stop each of `names` at once, then wait for them all: each within
    its own stop wait (the proxy's includes DRAIN_SECONDS for the requests under way)."""
    for n in names:
        try:
            server.stopProcess(n, False)
        except xmlrpc.client.Fault as e:
            if "NOT_RUNNING" not in e.faultString:
                raise click.ClickException(f"{n}: {e.faultString}") from None
    states = _until(server, names, STOPPED,
                    max(config.stop_wait(settings, n) for n in names) + 5)
    if stuck := [n for n in names if states.get(n) not in STOPPED]:
        raise click.ClickException(f"{', '.join(stuck)} did not stop; see `model status`")


@click.command()
@click.argument("name", required=False)
def restart(name: str | None) -> None:
    """Restart one process (engine, proxy, governor, sync), or all of them."""
    settings = load_settings()
    names = list(config.processes())
    if name and name not in names:
        raise click.UsageError(f"no process {name!r}; the processes: {', '.join(names)}")
    if not running_stack(settings):
        raise click.ClickException(
            ("its supervisord is gone; `model start` starts the stack again, in place of "
             "what it left running") if leftovers(settings) else
            "not running; start it with `model start`")
    server = client.connect(settings).supervisor
    targets = [name] if name else sorted(names, key=lambda n: config.PRIORITY.get(n, 50))
    began = time.monotonic()
    # The processes that use the engine stop together, then the engine: the proxy saves the
    # loaded models' contexts through it as it stops. An idle proxy stops at once; one with
    # requests under way finishes them first (up to DRAIN_SECONDS).
    for group in ([n for n in targets if n != "engine"], [n for n in targets if n == "engine"]):
        if group:
            _stop_together(settings, server, group)
    for n in targets:  # in start order, without waiting in between, as supervisord starts
        try:
            server.startProcess(n, False)
        except xmlrpc.client.Fault as e:
            if "ALREADY_STARTED" not in e.faultString:
                raise click.ClickException(f"{n}: {e.faultString}") from None
    # RUNNING once it has lived START_SECONDS; FATAL when it kept failing at start
    states = _until(server, targets, ("RUNNING", "FATAL"),
                    config.START_SECONDS * (config.START_RETRIES + 2) + 30)
    for n in targets:
        if states.get(n) == "RUNNING":
            click.echo(f"restarted {n}")
    if failed := [n for n in targets if states.get(n) != "RUNNING"]:
        raise click.ClickException("; ".join(
            f"{n} did not come back ({states.get(n)}); the last lines of "
            f"{config.log_file(settings, n)}:\n" + tail(config.log_file(settings, n))
            for n in failed))
    click.echo(f"took {time.monotonic() - began:.1f}s")


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _crashes(settings: Settings, name: str, since: float) -> list[dict]:
    try:
        lines = exits_file(settings).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("process") == name and not rec.get("expected") and rec.get("at", 0) > since:
            out.append(rec)
    return out


def _process_lines(settings: Settings) -> bool:
    """One line per process; True when every one runs."""
    infos = client.processes(settings) or []
    all_running = bool(infos)
    for p in infos:
        state, name = p["statename"], p["name"]
        line = f"  {name:9} {state:9}"
        if state == "RUNNING":
            line += f" pid {p['pid']}, up {_uptime(p['now'] - p['start'])}"
        crashes = _crashes(settings, name, time.time() - 3600)
        if crashes:
            line += (f"; crashed {len(crashes)} time(s) in the last hour, last at "
                     f"{time.strftime('%H:%M:%S', time.localtime(crashes[-1]['at']))}")
        if state == "FATAL":
            line += f"; it kept failing at start (tried again every {RETRY_FATAL} s)"
        click.echo(line)
        all_running = all_running and state == "RUNNING"  # STARTING: not well yet
        if state not in ("RUNNING", "STARTING"):
            log = config.log_file(settings, name)
            click.echo(f"    last lines of {log}:")
            click.echo("\n".join(f"    {x}" for x in tail(log, 5).splitlines()))
    return all_running


@click.command()
def status() -> None:
    """Each process (running, crashed, stopped), and what the proxy, the engine, the governor
    and Ollama say."""
    settings = load_settings()
    proc = running_stack(settings)
    ok = proc is not None
    if proc:
        click.echo(f"stack: running (supervisord pid {proc.pid}, up "
                   f"{_uptime(time.time() - proc.create_time())})")
        ok = _process_lines(settings)
    elif left := leftovers(settings):
        click.echo(f"stack: crashed (its supervisord is gone); still running without it: "
                   f"{members.describe(left)}. `model stop` stops them; `model start` starts "
                   "the stack again")
    elif recorded(settings):
        click.echo("stack: crashed (its supervisord is gone); the last lines of its log:")
        click.echo(tail(config.logs_dir(settings) / "supervisord.log", 5))
    else:
        click.echo("stack: stopped (start it with `model start`)")
    health = get_health(settings)
    if health is None:
        click.echo(f"proxy: not answering on {settings.proxy_url}")
        raise SystemExit(1)
    code, body = health
    if not ours(settings, health):
        click.echo(f"proxy: {settings.proxy_url} answers for another model-serve stack "
                   f"(state dir {body.get('state_dir')})")
        raise SystemExit(1)
    engine, governor, ollama = (body.get(k) or {} for k in ("engine", "governor", "ollama"))
    click.echo(f"proxy: {settings.proxy_url} ({body.get('status')}), "
               f"{body.get('models', 0)} models")
    for warning in body.get("warnings") or []:
        click.echo(f"warning: {warning}")
    click.echo(f"engine: {engine.get('name')} at {engine.get('url')}: "
               f"{'up' if engine.get('ok') else 'DOWN'}; loaded: "
               f"{', '.join(engine.get('loaded', [])) or 'none'}")
    click.echo(f"governor: {governor.get('url')}: {governor.get('status')}"
               + (f" ({governor['problem']})" if governor.get("problem") else ""))
    click.echo(f"ollama: {ollama.get('url')}: " + ("up" if ollama.get("ok") else
                                                   "not reachable (models it answers fail)"))
    _peer_lines(settings)
    # Ollama is optional; everything else must be well for a zero exit
    if code != 200 or not ok or not engine.get("ok") or governor.get("status") != "ok" or \
            body.get("warnings"):
        raise SystemExit(1)
