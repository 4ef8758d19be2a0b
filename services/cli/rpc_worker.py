"""`model rpc-worker`: llama.cpp's rpc-server on a helper machine, holding part of the weights
of models that name it in their `rpc:` (docs/rpc.md)."""

from __future__ import annotations

import os
import sys

import click

from services.cli.common import load_settings
from shared.rpc import DEFAULT_PORT, find_rpc_server, has_mem_option, is_loopback

MIB = 1024**2
# What rpc-server itself takes besides the buffers it is asked for (its code's data, the
# heap, a thread stack per core), counted by RLIMIT_DATA too
OWN_DATA_MIB = 32
THREAD_STACK_MIB = 8

NO_AUTH = ("llama.cpp's RPC has no authentication: anyone who can reach {address} can "
           "make this worker allocate memory and read and write what it holds. Listen on a "
           "network you trust alone (a private LAN, a VPN such as WireGuard or Tailscale), "
           "never on one open to others.")


def wide_warning(host: str, port: int) -> str:
    bar = "!" * 78
    return f"{bar}\nWARNING: rpc-worker listens on {host}:{port}, not on loopback.\n" + \
        NO_AUTH.format(address=f"{host}:{port}") + f"\n{bar}"


def data_cap(mem_mib: int, threads: int) -> int:
    """RLIMIT_DATA for a worker that offers `mem_mib` MiB of buffers."""
    return (mem_mib + OWN_DATA_MIB + THREAD_STACK_MIB * threads) * MIB


def command(binary: str, host: str, port: int, mem: int | None, threads: int | None,
            cache: bool) -> tuple[list[str], int | None, str | None]:
    """(argv, RLIMIT_DATA to set or None, a notice about --mem or None)."""
    argv = [binary, "--host", host, "--port", str(port)]
    if threads:
        argv += ["--threads", str(threads)]
    if cache:
        argv.append("--cache")
    if mem is None:
        return argv, None, None
    if has_mem_option(binary):
        return argv + ["--mem", str(mem)], None, None
    if sys.platform.startswith("linux"):
        cap = data_cap(mem, threads or os.cpu_count() or 1)
        return argv, cap, (f"--mem {mem}: this rpc-server takes no memory limit of its own "
                           "(it offers the machine's whole memory); the worker is capped "
                           f"at {cap // MIB} MiB of allocations (RLIMIT_DATA, its own "
                           "overhead included): a model that needs more of it fails to "
                           "load, with the error on the llama-server side")
    return argv, None, (f"--mem {mem} is NOT enforced: this rpc-server takes no memory "
                        f"limit and {sys.platform} offers no cap on a process's "
                        "allocations; the worker offers the machine's whole memory")


@click.command(name="rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. llama.cpp's RPC has no authentication: anything "
                   "but loopback lets whoever reaches it use this machine's memory.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--mem", type=click.IntRange(1), default=None, metavar="MB",
              help="The most memory (MiB) models may take on this worker.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads (default: rpc-server's, one per core).")
@click.option("--cache", is_flag=True,
              help="Keep the weights it is sent in a local file cache (rpc-server -c).")
def rpc_worker(host: str, port: int, mem: int | None, threads: int | None,
               cache: bool) -> None:
    """Run llama.cpp's rpc-server here, in the foreground (Ctrl-C stops it), for models
    whose `rpc:` in custom_models.yaml names this machine."""
    settings = load_settings()
    try:
        binary = find_rpc_server(settings)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    argv, cap, notice = command(binary, host, port, mem, threads, cache)
    if not is_loopback(host):
        click.secho(wide_warning(host, port), fg="red", bold=True, err=True)
    if notice:
        click.echo(f"rpc-worker: {notice}", err=True)
    click.echo(f"rpc-worker: {' '.join(argv)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if cap is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    # the worker is rpc-server itself from here: its logs on this terminal, its exit
    # status the command's, Ctrl-C and a service manager's signals reach it directly
    os.execv(binary, argv)
