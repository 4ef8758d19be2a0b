"""llama.cpp's RPC: rpc-server workers that hold part of a model's weights for a llama-server
on another machine (custom_models.yaml `rpc: [host:port, ...]`, `model rpc-worker`).

llama.cpp's RPC has no authentication: whoever reaches a worker's port can make it allocate
memory and read and write its buffers. Workers listen on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path

from shared.llama_server import built_path, find_llama_server
from shared.settings import Settings

DEFAULT_PORT = 50052
BINARY = "rpc-server"
# the names it has: llama.cpp's build target (and binary) is ggml-rpc-server since 2026
NAMES = (BINARY, "ggml-rpc-server")
HOW_TO_GET = ("run `make install` (it builds llama-server and rpc-server with llama.cpp's "
              "RPC backend into ~/.cache/model-serve), or install a llama.cpp built with "
              "-DGGML_RPC=ON and put its rpc-server on PATH")


def parse_address(text: object) -> tuple[str, int]:
    """(host, port) of `host:port` (`[v6]:port` for an IPv6 address); ValueError with the
    reason otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected host:port, got {text!r}")
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected host:port, e.g. 192.168.1.20:{DEFAULT_PORT}")
    if any(c in host for c in " ,;#/"):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def reachable(address: str, timeout: float = 1.0) -> bool:
    """A TCP connection to the worker opens within `timeout` seconds."""
    try:
        host, port = parse_address(address)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def find_rpc_server(settings: Settings) -> str:
    """Beside the llama-server in use first (the same build speaks the same protocol), then
    PATH, then the cached build; FileNotFoundError saying how to get one."""
    candidates: list[Path] = []
    try:
        server = Path(find_llama_server(settings))
        here = Path(shutil.which(str(server)) or server).resolve().parent
        candidates += [here / name for name in NAMES]
    except FileNotFoundError:
        pass
    candidates += [Path(p) for name in NAMES if (p := shutil.which(name))]
    candidates.append(built_path().parent / BINARY)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"{BINARY} not found: not beside llama-server, not on PATH and "
                            f"not built at {candidates[-1]}; {HOW_TO_GET}")


def has_mem_option(binary: str) -> bool:
    """Whether this rpc-server takes `-m/--mem MB` (older builds did; newer ones report the
    machine's whole memory and take no limit)."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--mem" in out.stdout + out.stderr
