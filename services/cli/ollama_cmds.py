"""`model pull`, `model rm`, `model list`, `model names`: Ollama's models and their ids."""

from __future__ import annotations

import click

from services.cli.common import load_catalog, load_settings, matching, with_ollama
from services.cli.sync_cmd import run_sync
from shared.ollama import Ollama


def file_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def table(rows: list[tuple[str, ...]]) -> None:
    for line in table_lines(rows):
        click.echo(line)


@click.command()
@click.argument("name")
def pull(name: str) -> None:
    """Pull NAME with Ollama (with progress), then sync so it is served at once."""
    settings = load_settings()

    async def work(ollama: Ollama) -> None:
        bars: dict[str, int] = {}
        async for item in ollama.stream("/api/pull", {"model": name, "stream": True}):
            total, done = item.get("total"), item.get("completed")
            if total and done is not None:
                pct = int(done * 100 / total)
                if bars.get(item.get("digest", "")) != pct:
                    bars[item.get("digest", "")] = pct
                    bar = "#" * (pct // 4)
                    click.echo(f"\r{item.get('status', '')[:30]:30} [{bar:25}] {pct:3d}%",
                               nl=pct == 100)
            else:
                click.echo(item.get("status", ""))

    with_ollama(settings, work)
    run_sync()


@click.command()
@click.argument("name", required=False)
@click.option("--filter", "filter_text", help="Remove every model whose name contains TEXT.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(name: str | None, filter_text: str | None, yes: bool) -> None:
    """Remove NAME (or every model matching --filter) from Ollama, then sync."""
    if bool(name) == bool(filter_text):
        raise click.UsageError("give a NAME or --filter TEXT")
    settings = load_settings()
    tags = with_ollama(settings, lambda o: o.tags())
    names = [m["name"] for m in tags]
    if name:
        targets = [n for n in names if n in (name, f"{name}:latest")]
    else:
        targets = matching(names, filter_text)
    if not targets:
        raise click.ClickException(f"no Ollama model matches {name or filter_text!r}")
    click.echo("\n".join(f"  {t}" for t in targets))
    if not yes and not click.confirm(f"Remove {len(targets)} model(s)?", default=False):
        raise click.Abort()

    async def work(ollama: Ollama) -> None:
        for target in targets:
            await ollama.call("DELETE", "/api/delete", {"model": target})
            click.echo(f"removed {target}")

    with_ollama(settings, work)
    run_sync()


def ollama_tags(settings) -> list[dict] | None:
    """Ollama's models; None, with a note on stderr, when Ollama does not answer (it is
    optional: the stack serves the catalog without it)."""
    try:
        return with_ollama(settings, lambda o: o.tags())
    except click.ClickException as e:
        click.echo(f"note: {e.message}; listing the models model-serve serves", err=True)
        return None


def served_rows(catalog, filter_text: str | None) -> list[tuple[str, ...]]:
    rows = [("ID", "CONTEXT", "BACKEND", "FILE")]
    for entry in catalog.entries.values():
        if matching([entry.id, *entry.aliases], filter_text):
            rows.append((entry.id, str(entry.ctx_size), entry.backend, entry.path))
    return rows


@click.command(name="list")
@click.argument("filter_text", required=False)
@click.option("--config", "served", is_flag=True, help="List served ids and their context.")
def list_models(filter_text: str | None, served: bool) -> None:
    """Ollama's models (or, with --config or without Ollama, the ids model-serve serves),
    filtered by TEXT."""
    settings = load_settings()
    tags = None if served else ollama_tags(settings)
    if tags is None:
        served = True
        rows = served_rows(load_catalog(settings), filter_text)
    else:
        rows = [("NAME", "SIZE", "PARAMS", "QUANT", "MODIFIED")]
        for m in tags:
            if matching([m["name"]], filter_text):
                d = m.get("details") or {}
                rows.append((m["name"], file_size(m.get("size", 0)), d.get("parameter_size", ""),
                             d.get("quantization_level", ""), m.get("modified_at", "")[:16]))
    if len(rows) == 1 and filter_text:
        raise click.ClickException(f"no model matches {filter_text!r}")
    if len(rows) == 1:
        click.echo("no models served (put GGUF files in MODELS_DIR, then `model sync`)"
                   if served else "Ollama has no models (pull one with `model pull NAME`)")
        return
    table(rows)


@click.command()
@click.argument("filter_text", required=False)
def names(filter_text: str | None) -> None:
    """The names clients may use for each served model: its id, its aliases and the Ollama
    name it was pulled as."""
    settings = load_settings()
    catalog = load_catalog(settings)
    rows = [("OLLAMA NAME", "SERVED ID", "BACKEND", "ALIASES")]
    for entry in catalog.entries.values():
        if matching([entry.ollama or "", entry.id, *entry.aliases], filter_text):
            ollama = ", ".join(entry.ollama_tags) or entry.ollama or "-"  # each tag
            rows.append((ollama, entry.id, entry.backend, ", ".join(entry.aliases) or "-"))
    if not any(e.ollama for e in catalog.entries.values()):
        try:
            with_ollama(settings, lambda o: o.call("GET", "/api/version"))
        except click.ClickException as e:
            click.echo(f"note: {e.message}; its models are not served", err=True)
    if len(rows) == 1 and filter_text:
        raise click.ClickException(f"no model matches {filter_text!r}")
    if len(rows) == 1:
        click.echo("no models served (put GGUF files in MODELS_DIR, then `model sync`)")
        return
    table(rows)
