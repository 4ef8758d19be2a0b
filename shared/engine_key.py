"""The engine's key: a random secret, new at each stack start, that only the stack's own
processes can read (STATE_DIR/engine.key, mode 0600). The engine and every model's own
llama-server require it, so no other program on the machine and no web page in the user's
browser can drive them behind the proxy's back."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from shared.settings import Settings

# the governor shows the key to the proxy in this header (Authorization is the API key's), so
# the causes it gives an unload (ttl, pressure, signal, ...) cannot come from a client
HEADER = "X-Model-Serve-Key"


def key_file(settings: Settings) -> Path:
    return settings.state_dir / "engine.key"


def _write(path: Path, key: str, replace: bool) -> None:
    """0600 from the first byte; readers see no file or the whole key, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def new_key(settings: Settings) -> str:
    """At a stack start: the previous key stops working."""
    key = secrets.token_urlsafe(32)
    _write(key_file(settings), key, replace=True)
    return key


def engine_key(settings: Settings) -> str:
    """The current key; made here when the stack was started without `model supervise`
    (`honcho start`, a service run alone)."""
    path = key_file(settings)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        _write(path, secrets.token_urlsafe(32), replace=path.exists())
        key = path.read_text().strip()
    return key
