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
from pathlib import Path

import click

from services.cli.common import load_settings
from services.runner.config import logs_dir
from shared.files import write_atomic
from shared.settings import ENV_KEYS, ROOT, Settings

LABEL = "model-serve"
UNIT = "model-serve.service"
CRON_BEGIN = f"# begin {LABEL} ({ROOT}): keeps the stack running"
CRON_END = f"# end {LABEL}"
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


def record_file(settings: Settings) -> Path:
    return settings.state_dir / "service.json"


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


def systemd_unit(settings: Settings) -> str:
    env = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n"
                  for k, v in environment().items())
    log = logs_dir(settings) / "service.log"
    return f"""# Written by `model service install`; removed by `model service uninstall`.
[Unit]
Description=model-serve: every local model on one port ({ROOT})
After=network-online.target

[Service]
Type=simple
WorkingDirectory={ROOT}
{env}ExecStart={_bin() / "model"} supervise
# supervisord stops its processes itself (the proxy finishing its streams) on SIGTERM
KillMode=mixed
TimeoutStopSec=120
# `model stop` ends it cleanly (exit 0) and it stays stopped; a crash restarts it
Restart=on-failure
RestartSec=2
StandardOutput=append:{log}
StandardError=inherit

[Install]
WantedBy=default.target
"""


def _systemd_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def launchd_plist(settings: Settings) -> bytes:
    log = str(logs_dir(settings) / "service.log")
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": [str(_bin() / "model"), "supervise"],
        "WorkingDirectory": str(ROOT),
        "EnvironmentVariables": environment(),
        "RunAtLoad": True,
        # restarted when it crashes; `model stop` (a clean exit) leaves it stopped
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "ExitTimeOut": 120,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    })


def cron_block(settings: Settings) -> str:
    """cron runs with a bare environment: PATH and the variables go on the line itself."""
    log = logs_dir(settings) / "service.log"
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in environment().items())
    run = (f"cd {shlex.quote(str(ROOT))} && env {env} {shlex.quote(str(_bin() / 'model'))} "
           f"start --quiet >> {shlex.quote(str(log))} 2>&1")
    return f"{CRON_BEGIN}\n@reboot {run}\n*/5 * * * * {run}\n{CRON_END}\n"


def target(platform: str) -> Path | None:
    home = Path.home()
    return {"launchd": home / "Library/LaunchAgents" / f"{LABEL}.plist",
            "systemd": home / ".config/systemd/user" / UNIT}.get(platform)


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


def _without_block(text: str) -> str:
    lines, out, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.strip() == CRON_BEGIN:
            inside = True
        elif inside and line.strip() == CRON_END:
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


@click.group()
def service() -> None:
    """Run the stack as a service: started at login, restarted after a crash."""


@service.command()
@_platform_option
@click.option("--no-start", is_flag=True, help="Install only; start at the next login.")
def install(platform: str | None, no_start: bool) -> None:
    """Install the service (launchd agent, systemd user unit, or cron line)."""
    settings = load_settings()
    platform = platform or default_platform()
    installed = _record(settings)
    if installed and installed["platform"] != platform:
        raise click.ClickException(
            f"a {installed['platform']} service is installed already; remove it with "
            "`model service uninstall` before installing another")
    logs_dir(settings).mkdir(parents=True, exist_ok=True)
    if platform == "cron":
        if not shutil.which("crontab"):
            raise click.ClickException("crontab is not installed; install cron, or use "
                                       "--platform systemd or launchd")
        block = cron_block(settings)
        subprocess.run(["crontab", "-"], input=_without_block(_crontab()) + block, text=True,
                       check=True)
        write_atomic(record_file(settings), json.dumps({"platform": "cron", "block": block}))
        click.echo("installed a cron line that runs `model start` at boot and every 5 "
                   "minutes (`crontab -l` shows it)")
        if not no_start:
            _run(str(_bin() / "model"), "start")
        return
    path = target(platform)
    data = launchd_plist(settings) if platform == "launchd" else \
        systemd_unit(settings).encode()
    if path.exists() and path.read_bytes() != data and not _ours(settings, path):
        raise click.ClickException(f"{path} exists and was not written by model-serve; "
                                   "it is left as it is")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    write_atomic(record_file(settings), json.dumps(
        {"platform": platform, "path": str(path), "sha256": _digest(data)}))
    click.echo(f"wrote {path}")
    if platform == "systemd":
        try:
            _run("systemctl", "--user", "daemon-reload")
            _run("systemctl", "--user", "enable", UNIT, *([] if no_start else ["--now"]))
        except click.ClickException as e:
            raise click.ClickException(f"{e.message}\n{NO_USER_MANAGER}; `model service "
                                       "uninstall` removes the unit written") from None
        click.echo("enabled; to start it at boot without a login: "
                   f"loginctl enable-linger {os.environ.get('USER', '$USER')}")
    elif not no_start:
        _run("launchctl", "bootstrap", f"gui/{os.getuid()}", str(path))
        click.echo("loaded; it starts at every login")


def _record(settings: Settings) -> dict | None:
    try:
        rec = json.loads(record_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("platform") in PLATFORMS else None


def _ours(settings: Settings, path: Path) -> bool:
    try:
        rec = json.loads(record_file(settings).read_text())
        return rec.get("path") == str(path) and rec.get("sha256") == _digest(path.read_bytes())
    except (OSError, ValueError):
        return False


@service.command()
@_platform_option
def uninstall(platform: str | None) -> None:
    """Stop and remove exactly what `model service install` wrote."""
    settings = load_settings()
    rec = _record(settings)
    if rec is None:
        raise click.ClickException("no service installed by model-serve (no record in "
                                   f"{record_file(settings)})")
    platform = platform or rec["platform"]
    if platform == "cron":
        current = _crontab()
        subprocess.run(["crontab", "-"], input=_without_block(current), text=True, check=True)
        click.echo("removed the model-serve cron line")
    else:
        path = Path(rec["path"])
        if platform == "systemd":
            _run("systemctl", "--user", "disable", "--now", UNIT, check=False)
        else:
            _run("launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}", check=False)
        if path.exists() and not _ours(settings, path):
            click.echo(f"{path} was changed since it was installed; left as it is")
        else:
            path.unlink(missing_ok=True)
            click.echo(f"removed {path}")
        if platform == "systemd":
            _run("systemctl", "--user", "daemon-reload", check=False)
    record_file(settings).unlink()


@service.command(name="status")
def service_status() -> None:
    """Whether a service is installed, where, and what its manager says."""
    settings = load_settings()
    rec = _record(settings)
    if rec is None:
        click.echo("no service installed (install one with `model service install`)")
        raise SystemExit(1)
    if rec["platform"] == "cron":
        there = rec["block"] in _crontab()
        click.echo("cron: " + ("installed" if there else "recorded, but the line is gone from "
                               "the crontab"))
        raise SystemExit(0 if there else 1)
    path = Path(rec["path"])
    click.echo(f"{rec['platform']}: {path} "
               + ("(as installed)" if _ours(settings, path) else "(changed or missing)"))
    if rec["platform"] == "systemd" and shutil.which("systemctl"):
        for what in ("is-enabled", "is-active"):
            out = _run("systemctl", "--user", what, UNIT, check=False)
            click.echo(f"  {what}: {(out.stdout or out.stderr).strip()}")
    elif rec["platform"] == "launchd" and shutil.which("launchctl"):
        out = _run("launchctl", "print", f"gui/{os.getuid()}/{LABEL}", check=False)
        click.echo("  loaded" if out.returncode == 0 else "  not loaded")
