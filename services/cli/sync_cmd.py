"""`model sync`, also run after `model pull` and `model rm`."""

from __future__ import annotations

import click

from services.cli.common import load_settings
from shared.engines import make_engine
from shared.sync import sync_all


def run_sync() -> None:
    settings = load_settings()
    engine = make_engine(settings)
    report, result = sync_all(settings, engine)
    for line in report.lines() if report else []:
        click.echo(line, err=line.startswith("note:"))
    for notice in result.catalog.notices:
        click.echo(f"note: {notice}", err=True)

    n = len(result.catalog.entries)
    if not result.engine_changed:
        click.echo(f"{n} models; engine config unchanged")
        return
    if result.reload_error:
        raise click.ClickException(f"{n} models; engine config updated, but "
                                   f"{result.reload_error}")
    if result.stopped:
        click.echo(f"note: {engine.name} stopped every loaded model to take up its new config: "
                   f"{', '.join(result.stopped)} (each loads again on its next request)",
                   err=True)
    if result.reloaded:
        click.echo(f"{n} models; engine config updated and reloaded")
    else:
        click.echo(f"{n} models; engine config updated (engine not running, it reads it on start)")


@click.command()
def sync() -> None:
    """Link Ollama's models, rescan models and custom_models.yaml, and reload the engine if
    its config changed."""
    run_sync()
