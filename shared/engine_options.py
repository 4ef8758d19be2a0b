"""The options a llama-server binary accepts, read from its own `--help`, once per binary.

llama-server has no machine-readable option list. Its help prints each option at column 0:
the spellings comma-separated, then the value hints (`-c,    --ctx-size N`,
`--control-vector-layer-range START END`), padded to column 40 before the description, or
alone on the line when longer (common/arg.cpp). The table is cached in STATE_DIR by the
binary's path, size and mtime, so a rebuilt llama-server is read again.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.files import write_if_possible
from shared.llama_server import find_llama_server
from shared.settings import Settings

log = logging.getLogger("model-serve")

# the padding before a description is at least 3 blanks; inside the option part, runs of
# blanks only follow the commas between spellings
_DESCRIPTION = re.compile(r"(?<![,\s])\s{2,}\S")
_SPELLING = re.compile(r"\s*(-{1,2}[A-Za-z0-9][\w.+-]*)(,?)")
_OPEN, _CLOSE = "<[{(", ">]})"


class OptionsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Options:
    binary: str
    values: dict[str, int]  # every spelling (`-c`, `--ctx-size`) → how many values it takes

    def unknown(self, flag: str) -> str:
        close = difflib.get_close_matches(flag, self.values, n=2, cutoff=0.75)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"{flag}: not an option of {self.binary}{hint}"


def _count_values(hint: str) -> int:
    """`START END` → 2; `<tensor name pattern>=<buffer type>,...` → 1 (blanks in brackets)."""
    count, depth, in_word = 0, 0, False
    for ch in hint:
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if ch.isspace() and depth <= 0:
            in_word = False
        elif not in_word:
            count, in_word = count + 1, True
    return count


def parse_help(text: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("-") or line.startswith("---"):
            continue  # descriptions are indented; `----- common params -----` heads a group
        m = _DESCRIPTION.search(line)
        head = line[: m.start()] if m else line.rstrip()
        spellings: list[str] = []
        while m := _SPELLING.match(head):
            spellings.append(m[1])
            head = head[m.end():]
            if not m[2]:
                break
        n = _count_values(head)
        table.update(dict.fromkeys(spellings, n))
    return table


def _stamp(binary: str) -> dict:
    st = os.stat(binary)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read(binary: str, state_dir: Path) -> Options:
    """The option table of `binary`; OptionsError when it does not run or is not a
    llama-server."""
    path = os.path.realpath(binary)
    cache_file = state_dir / "llama-server-options.json"
    try:
        stamp = _stamp(path)
    except OSError as e:
        raise OptionsError(f"cannot read {binary}: {e.strerror}") from None
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    cached = cache.get(path)
    if isinstance(cached, dict) and cached.get("stamp") == stamp:
        return Options(binary, cached["options"])
    try:
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OptionsError(f"{binary} --help did not run: {e}") from None
    table = parse_help(done.stdout)
    if "--port" not in table or "--model" not in table:
        raise OptionsError(f"{binary} --help lists no --model and --port: not a llama-server")
    cache[path] = {"stamp": stamp, "options": table}
    write_if_possible(cache_file, json.dumps(cache, indent=1, sort_keys=True))
    return Options(binary, table)


@functools.cache
def _say_unchecked(reason: str) -> None:
    log.warning("%s; per-model llama-server flags are not checked by name", reason)


def installed(settings: Settings) -> Options | None:
    """The option table of the llama-server the engine runs; None (said once) without one,
    and then flags are grouped by the words that follow them, unchecked."""
    try:
        return read(find_llama_server(settings), settings.state_dir)
    except (FileNotFoundError, OptionsError) as e:
        _say_unchecked(str(e))
        return None
