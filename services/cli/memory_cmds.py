"""`model stats`, `model load`, `model unload`: the loaded models and their memory."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import click

from services.cli.common import load_settings
from services.cli.ollama_cmds import table
from shared.proxy_client import ProxyClient, ProxyError


def call_proxy(method: str, *args, timeout: float = 900):
    settings = load_settings()

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            return await getattr(ProxyClient(settings.proxy_url, s, settings.api_key),
                                 method)(*args)

    try:
        return asyncio.run(go())
    except ProxyError as e:
        raise click.ClickException(str(e)) from None
    except (aiohttp.ClientError, TimeoutError) as e:
        raise click.ClickException(f"the proxy at {settings.proxy_url} is not answering "
                                   f"({e.__class__.__name__}); start it with `model start`") \
            from None


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**2:,.0f} MiB"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


@click.command()
def stats() -> None:
    """Loaded models: backend, context, slots, state, idle, TTL left, memory, pinned."""
    data = call_proxy("running")
    now = time.time()
    rows = [("MODEL", "BACKEND", "CONTEXT", "SLOTS", "STATE", "IDLE", "TTL LEFT",
             "ESTIMATED", "MEASURED", "PINNED")]
    for m in data["models"]:
        left = max(0.0, m["expires_at"] - now) if m["expires_at"] else None
        rows.append((m["id"], m["backend"], str(m["context_length"] or "-"),
                     str(m["parallel"] or "-"),
                     f"{m['state']}" + (f" ({m['in_flight']} busy)" if m["in_flight"] else ""),
                     ago(m["idle_seconds"]), ago(left), mib(m["memory"]["estimated"]),
                     mib(m["memory"]["measured"]), "yes" if m["pinned"] else ""))
    if len(rows) > 1:
        table(rows)
    else:
        click.echo("no models loaded")
    if not data.get("ollama", {}).get("ok", True):
        click.echo(f"note: Ollama is not reachable at {data['ollama']['url']}: the models it "
                   "holds are not listed")
    s = data["system"]
    click.echo(f"system memory: {mib(s['used'])} used of {mib(s['total'])} ({s['used_pct']}%, "
               f"limit {s['threshold_pct']:g}%): the system counts {mib(s['os_used'])}, "
               f"models' mapped files add {mib(s['models_reclaimable'])}"
               + (f", loads in progress reserve {mib(s['reserved'])}" if s["reserved"] else "")
               + (f", other programs hold {mib(s['other_programs'])}"
                  if s.get("other_programs") else ""))
    for m in data["models"]:
        if m["state"] == "queued" and m.get("waiting_for"):
            click.echo(f"{m['id']} waits {ago(m['waiting_seconds'])} for room: "
                       f"{m['waiting_for']}")
    if s["governor"] == "down":
        click.echo("governor: down (idle models stay past their TTL and memory pressure is "
                   "not watched)")
    else:
        click.echo("pressure signals: " + ("; ".join(s.get("firing", [])) or "none firing")
                   + "".join(f"\n  unavailable: {m}" for m in s.get("missing", [])))
        if s.get("note"):
            click.echo(f"governor: {s['note']}")


@click.command()
@click.argument("name")
def load(name: str) -> None:
    """Load NAME ahead of use (admission first, as for a request)."""
    click.echo(f"loaded {call_proxy('load', name)['model']}")


@click.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Unload even while it serves requests.")
def unload(name: str, force: bool) -> None:
    """Unload NAME now (refused while it serves a request, unless --force)."""
    click.echo(f"unloaded {call_proxy('unload', name, force)['model']}")
