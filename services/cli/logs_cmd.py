"""`model logs`: what the stack's processes and models wrote, merged in time order."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from services.cli.common import load_settings
from services.runner import config
from shared.engines.base import section_name
from shared.settings import Settings
from shared.sync import load_last_good

_STAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def log_files(settings: Settings, name: str | None) -> list[Path]:
    """A process's log, the router's, a model's (by id or alias), or, with no name, every
    process's."""
    processes = list(config.processes())
    if name is None:
        return [config.log_file(settings, n) for n in processes]
    if name in processes or name == "router":
        return [config.log_file(settings, name)]
    catalog = load_last_good(settings)
    entry = catalog.resolve(name) if catalog else None
    path = config.logs_dir(settings) / "models" / f"{section_name(entry.id if entry else name)}.log"
    if entry is None and not path.exists():
        raise click.UsageError(f"no process or model {name!r}; the processes: "
                               f"{', '.join(processes)}, router, or a model id")
    return [path]


def _read(path: Path, offset: int) -> tuple[list[str], int]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < offset:  # rotated: start from the top of the new file
                offset = 0
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for its end
    return data[:end].decode(errors="replace").splitlines(), offset + end


def _entries(lines: list[str]) -> list[list[str]]:
    """Lines grouped by entry: a traceback's lines carry no time and stay with the line
    that logged it."""
    out: list[list[str]] = []
    for line in lines:
        if out and not _STAMP.match(line):
            out[-1].append(line)
        else:
            out.append([line])
    return out


@click.command()
@click.argument("name", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C ends).")
@click.option("-n", "--lines", default=40, show_default=True, help="How many lines to show.")
def logs(name: str | None, follow: bool, lines: int) -> None:
    """The logs of the stack (every process, merged by time), of one process (engine, proxy,
    governor, sync, router) or of one model."""
    settings = load_settings()
    files = log_files(settings, name)
    offsets = {}
    entries: list[list[str]] = []
    for path in files:
        text, offsets[path] = _read(path, 0)
        entries += _entries(text)[-lines:]
    # each entry starts with its time (shared/logs.py), so a stable sort merges them
    if len(files) > 1:
        entries.sort(key=lambda e: e[0][:23])
    for line in [line for entry in entries for line in entry][-lines:]:
        click.echo(line)
    if not follow:
        if not any(p.exists() for p in files):
            click.echo(f"no log yet at {', '.join(map(str, files))}", err=True)
        return
    try:
        while True:
            time.sleep(0.5)
            for path in files:
                text, offsets[path] = _read(path, offsets[path])
                for line in text:
                    click.echo(line)
    except KeyboardInterrupt:
        pass
