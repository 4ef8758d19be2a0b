"""`model top`: a live view of the stack's memory and models, redrawn in place.

Plain ANSI (home, clear to end of line/screen, the alternate screen) rather than curses, so
it works over SSH on any terminal and needs no terminfo; keys are read in cbreak mode, which
keeps Ctrl-C a signal.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator

import click

from services.cli.common import load_settings
from services.cli.memory_cmds import ago, call_proxy, mib
from services.cli.ollama_cmds import table_lines

BAR = 10
# A frame must come back well within a refresh or two; a hung proxy is reported, not waited on
FETCH_TIMEOUT = 5.0
EVENTS = 6  # the latest loads, unloads (with why) and refusals under the table
# Models seen loaded earlier in this session and unloaded since: /running lists loaded models
# only, so top itself remembers them to show what was recently used
RECENT = 5


def bar(part: int | None, whole: int) -> str:
    filled = 0 if not part or whole <= 0 else min(BAR, round(BAR * part / whole))
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def footprint(m: dict) -> tuple[int | None, bool]:
    """The model's memory: measured when it has been, else the estimate (True: estimated)."""
    measured = m["memory"]["measured"]
    return (measured, False) if measured is not None else (m["memory"]["estimated"], True)


def header(system: dict, models: list[dict]) -> list[str]:
    limit = system["limit"]
    share = sum(footprint(m)[0] or 0 for m in models)
    lines = [f"memory  {mib(system['used'])} used of {mib(limit)} budget "
             f"{bar(system['used'], limit)}  ({system['used_pct']}% of "
             f"{mib(system['total'])}, threshold {system['threshold_pct']:g}%)"
             + (f", loads reserve {mib(system['reserved'])}" if system.get("reserved") else "")
             + (f", other programs hold {mib(system['other_programs'])}"
                if system.get("other_programs") else ""),
             f"models  {mib(share)} {bar(share, limit)}"]
    if system.get("governor") == "down":
        # the proxy then loads models itself: the user must know admission is off
        lines.append("governor DOWN: idle models stay past their TTL and memory pressure is "
                     "not watched")
    else:
        firing = system.get("firing") or []
        lines.append("governor up; pressure: " + ("; ".join(firing) or "none firing")
                     + "".join(f"; unavailable: {m}" for m in system.get("missing") or []))
        if system.get("note"):
            lines.append(f"governor: {system['note']}")
    return lines


def model_rows(models: list[dict], recent: list[dict], budget: int, now: float) -> list[str]:
    rows = [("MODEL", "BACKEND", "STATE", "MEMORY", "", "ACTIVE", "QUEUED", "IDLE",
             "TTL LEFT", "PINNED")]
    # loaded before loading, the biggest first: the big ones decide whether a load fits
    for m in sorted(models, key=lambda m: (m["state"] != "loaded", -(footprint(m)[0] or 0))):
        size, estimated = footprint(m)
        queue = m.get("queue") or {}
        queued = str(queue.get("queued", 0))
        if queue.get("queued"):
            queued += f" (longest {ago(queue['longest_queued_seconds'])})"
        # the proxy counts a request in flight from its arrival, so the queued are in it too
        answering = max(0, m["in_flight"] - queue.get("queued", 0))
        left = None if m["pinned"] or not m["expires_at"] else max(0.0, m["expires_at"] - now)
        idle, ttl = ago(m["idle_seconds"]), ago(left)
        if m["in_flight"]:  # neither idle nor counting down while it has requests
            idle = "in use"
            if left is not None:
                ttl = "in use"
        rows.append((m["id"], m["backend"], m["state"],
                     ("~" if estimated else "") + mib(size), bar(size, budget),
                     str(answering), queued, idle, ttl, "yes" if m["pinned"] else ""))
    for m in recent:
        rows.append((m["id"], m["backend"], "unloaded", "-", "", "", "",
                     ago(now - m["last_used"]) if m["last_used"] else "-", "", ""))
    if len(rows) == 1:
        return ["no models loaded"]
    return table_lines(rows)


def describe(event: dict) -> str:
    """One event: the model, then what happened to it (the dashboard has the kind in a column
    of its own)."""
    what = {"loading": "loading",
            "loaded": f"loaded in {event.get('seconds')}s",
            "unloaded": f"unloaded: {event.get('reason')}"
                        + (f" ({event['detail']})" if event.get("detail") else ""),
            "refused": f"refused: {event.get('message')}",
            "load_failed": f"load failed: {event.get('message')}",
            "context_saved": f"context saved: slot {event.get('slot')}, "
                             f"{event.get('tokens')} tokens",
            "context_restored": f"context restored: slot {event.get('slot')}, "
                                f"{event.get('tokens')} tokens",
            "context_restore_failed": f"context not restored: {event.get('reason')}: "
                                      f"{event.get('message')}"}.get(event["kind"],
                                                                     event["kind"])
    at = time.strftime("%H:%M:%S", time.localtime(event["at"]))
    return f"{at}  {event['model']} ({event['backend']}) {what}"


def frame(url: str, data: dict | None, error: str | None, recent: list[dict],
          interactive: bool, events: list[dict] = ()) -> list[str]:
    now = time.time()
    title = f"model top  {url}  {time.strftime('%H:%M:%S', time.localtime(now))}"
    lines = [title + ("   (q quits)" if interactive else ""), ""]
    if data is None:
        return [*lines, f"proxy: {error}" + ("; retrying" if interactive else "")]
    system, models = data["system"], data["models"]
    lines += header(system, models)
    if not data.get("ollama", {}).get("ok", True):
        lines.append(f"note: Ollama is not reachable at {data['ollama']['url']}: "
                     "the models it holds are not listed")
    lines.append("")
    lines += model_rows(models, recent, system["limit"], now)
    if any(footprint(m)[1] for m in models):
        lines.append("~ estimated (not measured yet)")
    lines += [f"{m['id']} waits {ago(m['waiting_seconds'])} for room: {m['waiting_for']}"
              for m in models if m["state"] == "queued" and m.get("waiting_for")]
    if events:
        lines += ["", "EVENTS", *(describe(e) for e in reversed(events[-EVENTS:]))]
    return lines


class Session:
    """One `model top`: fetches /running and remembers models that have left since."""

    def __init__(self) -> None:
        self.url = load_settings().proxy_url
        self.seen: dict[tuple[str, str], dict] = {}

    def next_frame(self, interactive: bool) -> tuple[list[str], bool]:
        """The frame, and whether the proxy answered."""
        try:
            data, error = call_proxy("running", timeout=FETCH_TIMEOUT), None
            events = call_proxy("events", timeout=FETCH_TIMEOUT).get("events", [])
        except click.ClickException as e:
            data, error, events = None, e.message, []
        try:
            recent: list[dict] = []
            if data is not None:
                loaded = {(m["backend"], m["id"]) for m in data["models"]}
                for m in data["models"]:
                    self.seen[(m["backend"], m["id"])] = m
                recent = sorted((m for k, m in self.seen.items() if k not in loaded),
                                key=lambda m: -(m["last_used"] or 0))[:RECENT]
            return frame(self.url, data, error, recent, interactive, events), data is not None
        except (KeyError, TypeError, AttributeError):
            # a proxy of another version: say so in the frame rather than crash the view
            return frame(self.url, None, "its /running answer is not one this `model top` "
                         "reads (another model-serve version?)", [], interactive), False


@contextlib.contextmanager
def screen(fd: int | None) -> Iterator[None]:
    """The alternate screen with the cursor hidden, and keys unechoed one at a time; the
    terminal is given back as it was however top ends."""
    old = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        sys.stdout.write("\x1b[?1049h\x1b[?25l")
        yield
    finally:
        sys.stdout.write("\x1b[?25h\x1b[?1049l")
        sys.stdout.flush()
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


def draw(lines: list[str]) -> None:
    cols, rows = shutil.get_terminal_size()
    # overwrite in place rather than clear first: a full clear flickers, worst over SSH; the
    # last row gets no newline so the screen never scrolls
    text = "\x1b[K\n".join(line[:cols] for line in lines[:rows])
    sys.stdout.write("\x1b[H" + text + "\x1b[K\x1b[J")
    sys.stdout.flush()


def quit_pressed(fd: int | None, seconds: float) -> bool:
    """Wait `seconds` for a key; True when it was q."""
    if fd is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            keys = os.read(fd, 64)
            if not keys or b"q" in keys.lower():  # no bytes: the terminal is gone
                return True
    return False


@click.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (also when stdout is "
              "not a terminal).")
def top(interval: float, once: bool) -> None:
    """A live view: memory by the governor's accounting, and each model's memory, requests
    and queue, idle time and TTL. q or Ctrl-C quits."""
    session = Session()
    if once or not sys.stdout.isatty():
        lines, ok = session.next_frame(interactive=False)
        click.echo("\n".join(lines))
        if not ok:
            raise SystemExit(1)
        return
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    with contextlib.suppress(KeyboardInterrupt), screen(fd):
        while True:
            draw(session.next_frame(interactive=True)[0])
            if quit_pressed(fd, interval):
                break
