"""`model service install|uninstall|status`: the stack started at login (or boot) and kept
running by the operating system's own service manager.

Every platform runs the same thing as `model start`: `model supervise` (supervisord, which
restarts each process on its own), so `model status`, `restart`, `logs` and `stop` work the
same however the stack was started. The service manager keeps supervisord itself alive:
launchd (KeepAlive) on a Mac, a systemd user unit (Restart=on-failure) on Linux, or a cron
line that runs `model start` every 5 minutes where neither is available. `model stop` ends
supervisord cleanly, so a service manager leaves it stopped until the next login or
`model service install`.

What install writes is recorded in STATE_DIR/service.json; uninstall removes exactly that,
and only while it is unchanged.

`--rpc-worker` does the same for `model rpc-worker` (llama.cpp's rpc-server on a helper
machine), as a service of its own beside the stack's: its own unit, plist or cron line,
recorded in STATE_DIR/rpc-worker-service.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from services.cli.common import load_settings
from services.runner.config import logs_dir
from shared.files import write_atomic
from shared.settings import ENV_KEYS, ROOT, Settings


@dataclass(frozen=True)
class Kind:
    """One service `model service` installs: the stack, or an RPC worker."""

    label: str
    record: str  # its file in STATE_DIR
    what: str  # for the unit's description and the cron line's comment
    option: str  # how the commands name it ("" for the stack)

    @property
    def unit(self) -> str:
        return f"{self.label}.service"

    @property
    def cron_begin(self) -> str:
        return f"# begin {self.label} ({ROOT}): {self.what}"

    @property
    def cron_end(self) -> str:
        return f"# end {self.label}"


STACK = Kind("model-serve", "service.json", "keeps the stack running", "")
RPC_WORKER = Kind("model-serve-rpc-worker", "rpc-worker-service.json",
                  "keeps `model rpc-worker` running", " --rpc-worker")
LABEL, UNIT = STACK.label, STACK.unit
CRON_BEGIN, CRON_END = STACK.cron_begin, STACK.cron_end
PLATFORMS = ("launchd", "systemd", "cron")
USER_MANAGER_UP = ("running", "degraded", "starting", "initializing", "maintenance")
NO_USER_MANAGER = ("systemd's user manager did not answer (no login session?): run "
                   "`loginctl enable-linger $USER` and log in again, or use --platform cron")


def default_platform() -> str:
    if sys.platform == "darwin":
        return "launchd"
    probe = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True,
                           text=True) if shutil.which("systemctl") else None
    # "offline": no user manager to talk to (a login without a session, a container)
    return "systemd" if probe and probe.stdout.strip() in USER_MANAGER_UP else "cron"


def record_file(settings: Settings, kind: Kind = STACK) -> Path:
    return settings.state_dir / kind.record


def _bin() -> Path:
    return Path(sys.executable).parent


def _path_env() -> str:
    # Homebrew's llama.cpp (and llama-swap) must be found as in the user's shell
    extra = ["/opt/homebrew/bin", "/usr/local/bin"] if sys.platform == "darwin" else []
    return os.pathsep.join([str(_bin()), *extra, os.environ.get("PATH", "/usr/bin:/bin")])


def environment() -> dict[str, str]:
    """PATH, and every model-serve variable set in this shell; .env is read by the services
    themselves at every start, so edits to it need no reinstall."""
    return {"PATH": _path_env(), **{k: v for k, v in os.environ.items() if k in ENV_KEYS}}


def program(kind: Kind, worker: list[str] | None = None) -> list[str]:
    """What the service runs: `model supervise`, or `model rpc-worker` with its options."""
    model = str(_bin() / "model")
    return [model, "supervise"] if kind is STACK else [model, "rpc-worker", *(worker or [])]


def log_file(settings: Settings, kind: Kind = STACK) -> Path:
    return logs_dir(settings) / ("service.log" if kind is STACK else "rpc-worker.log")


def systemd_unit(settings: Settings, kind: Kind = STACK,
                 worker: list[str] | None = None) -> str:
    env = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n"
                  for k, v in environment().items())
    log = log_file(settings, kind)
    start = " ".join(_systemd_quote(w) if any(c in w for c in ' "\\%$') else w
                     for w in program(kind, worker))
    if kind is STACK:
        description = f"model-serve: every local model on one port ({ROOT})"
        stopping = "# supervisord stops its processes itself (the proxy finishing its streams) " \
            """on SIGTERM
KillMode=mixed
TimeoutStopSec=120
# `model stop` ends it cleanly (exit 0) and it stays stopped; a crash restarts it
Restart=on-failure"""
    else:
        description = f"model-serve: llama.cpp rpc-server for other machines' models ({ROOT})"
        stopping = """TimeoutStopSec=30
# restarted whenever it ends but by `systemctl --user stop`
Restart=always"""
    written = f"`model service install{kind.option}`; removed by `model service " \
        f"uninstall{kind.option}`"
    return f"""# Written by {written}.
[Unit]
Description={description}
After=network-online.target

[Service]
Type=simple
WorkingDirectory={ROOT}
{env}ExecStart={start}
{stopping}
RestartSec=2
StandardOutput=append:{log}
StandardError=inherit

[Install]
WantedBy=default.target
"""


def _systemd_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def launchd_plist(settings: Settings, kind: Kind = STACK,
                  worker: list[str] | None = None) -> bytes:
    log = str(log_file(settings, kind))
    return plistlib.dumps({
        "Label": kind.label,
        "ProgramArguments": program(kind, worker),
        "WorkingDirectory": str(ROOT),
        "EnvironmentVariables": environment(),
        "RunAtLoad": True,
        # restarted when it crashes; `model stop` (a clean exit) leaves it stopped
        "KeepAlive": {"SuccessfulExit": False} if kind is STACK else True,
        "ThrottleInterval": 5,
        "ExitTimeOut": 120,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    })


def cron_block(settings: Settings, kind: Kind = STACK, worker: list[str] | None = None) -> str:
    """cron runs with a bare environment: PATH and the variables go on the line itself. An
    RPC worker runs under `flock -n`, so the line every 5 minutes starts it only when it is
    not running."""
    log = log_file(settings, kind)
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in environment().items())
    if kind is STACK:
        command = f"{shlex.quote(str(_bin() / 'model'))} start --quiet"
    else:
        lock = settings.state_dir / "rpc-worker.lock"
        command = " ".join(map(shlex.quote, ["flock", "-n", str(lock),
                                             *program(kind, worker)]))
    run = (f"cd {shlex.quote(str(ROOT))} && env {env} {command} "
           f">> {shlex.quote(str(log))} 2>&1")
    return f"{kind.cron_begin}\n@reboot {run}\n*/5 * * * * {run}\n{kind.cron_end}\n"


def target(platform: str, kind: Kind = STACK) -> Path | None:
    home = Path.home()
    return {"launchd": home / "Library/LaunchAgents" / f"{kind.label}.plist",
            "systemd": home / ".config/systemd/user" / kind.unit}.get(platform)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        if check:
            raise click.ClickException(f"{argv[0]} is not installed on this machine")
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]} is not installed")
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} failed: "
                                   f"{(result.stderr or result.stdout).strip()}")
    return result


def _crontab() -> str:
    result = _run("crontab", "-l", check=False)
    return result.stdout if result.returncode == 0 else ""


def _without_block(text: str, kind: Kind = STACK) -> str:
    lines, out, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.strip() == kind.cron_begin:
            inside = True
        elif inside and line.strip() == kind.cron_end:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _platform_option(f):
    return click.option("--platform", type=click.Choice(PLATFORMS), default=None,
                        help="launchd (macOS), systemd (Linux), or cron (either, a fallback); "
                             "default: this machine's own")(f)


def _kind_option(f):
    return click.option("--rpc-worker", "rpc_worker", is_flag=True,
                        help="The `model rpc-worker` service (llama.cpp's rpc-server for "
                             "other machines' models) instead of the stack's.")(f)


def _kind(rpc_worker: bool) -> Kind:
    return RPC_WORKER if rpc_worker else STACK


@click.group()
def service() -> None:
    """Run the stack (or an RPC worker) as a service: started at login, restarted after a
    crash."""


@service.command()
@_platform_option
@click.option("--no-start", is_flag=True, help="Install only; start at the next login.")
@_kind_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="--rpc-worker: the address it listens on (llama.cpp's RPC has no "
                   "authentication; see docs/rpc.md before opening it).")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535),
              help="--rpc-worker: its port.")
@click.option("--mem", type=click.IntRange(1), default=None, metavar="MB",
              help="--rpc-worker: the most memory (MiB) models may take on it.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="--rpc-worker: threads for its CPU device (rpc-server's default: half "
                   "the cores).")
@click.option("--cache", is_flag=True,
              help="--rpc-worker: keep a local file cache of the tensors it is sent.")
def install(platform: str | None, no_start: bool, rpc_worker: bool, host: str, port: int,
            mem: int | None, threads: int | None, cache: bool) -> None:
    """Install the service (launchd agent, systemd user unit, or cron line)."""
    settings = load_settings()
    kind = _kind(rpc_worker)
    worker: list[str] = []
    if kind is RPC_WORKER:
        from services.cli.rpc_worker import wide_warning
        from shared.rpc import find_rpc_server, is_loopback

        try:
            find_rpc_server(settings)
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from None
        worker = ["--host", host, "--port", str(port), *(["--mem", str(mem)] if mem else []),
                  *(["--threads", str(threads)] if threads else []),
                  *(["--cache"] if cache else [])]
        if not is_loopback(host):
            click.secho(wide_warning(host, port), fg="red", bold=True, err=True)
    elif (host, port, mem, threads, cache) != ("127.0.0.1", 50052, None, None, False):
        raise click.ClickException("--host, --port, --mem, --threads and --cache are the RPC "
                                   "worker's: add --rpc-worker")
    platform = platform or default_platform()
    installed = _record(settings, kind)
    if installed and installed["platform"] != platform:
        raise click.ClickException(
            f"a {installed['platform']} service is installed already; remove it with "
            f"`model service uninstall{kind.option}` before installing another")
    listen = {"listen": f"{host}:{port}"} if kind is RPC_WORKER else {}
    logs_dir(settings).mkdir(parents=True, exist_ok=True)
    if platform == "cron":
        if not shutil.which("crontab"):
            raise click.ClickException("crontab is not installed; install cron, or use "
                                       "--platform systemd or launchd")
        if kind is RPC_WORKER and not shutil.which("flock"):
            raise click.ClickException("flock is not installed (util-linux), which keeps cron "
                                       "from starting a second worker; use --platform "
                                       "systemd or launchd")
        block = cron_block(settings, kind, worker)
        subprocess.run(["crontab", "-"], input=_without_block(_crontab(), kind) + block,
                       text=True, check=True)
        write_atomic(record_file(settings, kind),
                     json.dumps({"platform": "cron", "block": block, **listen}))
        if kind is STACK:
            click.echo("installed a cron line that runs `model start` at boot and every 5 "
                       "minutes (`crontab -l` shows it)")
            if not no_start:
                _run(str(_bin() / "model"), "start")
        else:
            click.echo("installed a cron line that starts `model rpc-worker` at boot and "
                       "again within 5 minutes whenever it is not running (`crontab -l` "
                       "shows it)")
        return
    path = target(platform, kind)
    data = launchd_plist(settings, kind, worker) if platform == "launchd" else \
        systemd_unit(settings, kind, worker).encode()
    if path.exists() and path.read_bytes() != data and not _ours(settings, path, kind):
        raise click.ClickException(f"{path} exists and was not written by model-serve; "
                                   "it is left as it is")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    write_atomic(record_file(settings, kind), json.dumps(
        {"platform": platform, "path": str(path), "sha256": _digest(data), **listen}))
    click.echo(f"wrote {path}")
    if platform == "systemd":
        try:
            _run("systemctl", "--user", "daemon-reload")
            _run("systemctl", "--user", "enable", kind.unit, *([] if no_start else ["--now"]))
            if kind is RPC_WORKER and not no_start:
                _run("systemctl", "--user", "restart", kind.unit)  # a changed --host, --port
        except click.ClickException as e:
            raise click.ClickException(f"{e.message}\n{NO_USER_MANAGER}; `model service "
                                       f"uninstall{kind.option}` removes the unit "
                                       "written") from None
        click.echo("enabled; to start it at boot without a login: "
                   f"loginctl enable-linger {os.environ.get('USER', '$USER')}")
    elif not no_start:
        _run("launchctl", "bootstrap", f"gui/{os.getuid()}", str(path))
        click.echo("loaded; it starts at every login")


def record(settings: Settings, kind: Kind = STACK) -> dict | None:
    """What `model service install` recorded for the service, None when none is."""
    try:
        rec = json.loads(record_file(settings, kind).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("platform") in PLATFORMS else None


_record = record


def _ours(settings: Settings, path: Path, kind: Kind = STACK) -> bool:
    try:
        rec = json.loads(record_file(settings, kind).read_text())
        return rec.get("path") == str(path) and rec.get("sha256") == _digest(path.read_bytes())
    except (OSError, ValueError):
        return False


@service.command()
@_platform_option
@_kind_option
def uninstall(platform: str | None, rpc_worker: bool) -> None:
    """Stop and remove exactly what `model service install` wrote."""
    settings = load_settings()
    kind = _kind(rpc_worker)
    rec = _record(settings, kind)
    if rec is None:
        raise click.ClickException("no service installed by model-serve (no record in "
                                   f"{record_file(settings, kind)})")
    platform = platform or rec["platform"]
    if platform == "cron":
        current = _crontab()
        subprocess.run(["crontab", "-"], input=_without_block(current, kind), text=True,
                       check=True)
        click.echo(f"removed the {kind.label} cron line")
        if kind is RPC_WORKER:
            click.echo("a worker it started runs on until it is stopped (Ctrl-C where it "
                       "runs, or kill its rpc-server)")
    else:
        path = Path(rec["path"])
        if platform == "systemd":
            _run("systemctl", "--user", "disable", "--now", kind.unit, check=False)
        else:
            _run("launchctl", "bootout", f"gui/{os.getuid()}/{kind.label}", check=False)
        if path.exists() and not _ours(settings, path, kind):
            click.echo(f"{path} was changed since it was installed; left as it is")
        else:
            path.unlink(missing_ok=True)
            click.echo(f"removed {path}")
        if platform == "systemd":
            _run("systemctl", "--user", "daemon-reload", check=False)
    record_file(settings, kind).unlink()


@service.command(name="status")
@_kind_option
def service_status(rpc_worker: bool) -> None:
    """Whether a service is installed, where, and what its manager says."""
    settings = load_settings()
    kind = _kind(rpc_worker)
    rec = _record(settings, kind)
    if rec is None:
        click.echo(f"no service installed (install one with `model service install"
                   f"{kind.option}`)")
        raise SystemExit(1)
    if rec.get("listen"):
        click.echo(f"rpc-worker listening on {rec['listen']}")
    if rec["platform"] == "cron":
        there = rec["block"] in _crontab()
        click.echo("cron: " + ("installed" if there else "recorded, but the line is gone from "
                               "the crontab"))
        raise SystemExit(0 if there else 1)
    path = Path(rec["path"])
    click.echo(f"{rec['platform']}: {path} "
               + ("(as installed)" if _ours(settings, path, kind) else "(changed or missing)"))
    if rec["platform"] == "systemd" and shutil.which("systemctl"):
        for what in ("is-enabled", "is-active"):
            out = _run("systemctl", "--user", what, kind.unit, check=False)
            click.echo(f"  {what}: {(out.stdout or out.stderr).strip()}")
    elif rec["platform"] == "launchd" and shutil.which("launchctl"):
        out = _run("launchctl", "print", f"gui/{os.getuid()}/{kind.label}", check=False)
        click.echo("  loaded" if out.returncode == 0 else "  not loaded")
