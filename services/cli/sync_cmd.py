"""`model sync`, also run after `model pull` and `model rm`."""

from __future__ import annotations

import click

from services.cli.common import load_settings
from shared.engines import make_engine
from shared.sync import run_bridge, sync_all


def run_sync() -> None:
    settings = load_settings()
    engine = make_engine(settings)
    report, result = sync_all(settings, engine)
    for line in report.lines() if report else []:
        click.echo(line, err=line.startswith("note:"))
    for notice in result.catalog.notices:
        click.echo(f"note: {notice}", err=True)

    said = f"{len(result.catalog.entries)} models; engine config " + \
        ("updated" if result.engine_changed else "unchanged")
    reload = result.reload
    if reload is None:
        click.echo(said)
        return
    if reload.error:
        raise click.ClickException(f"{said}, but the engine did not take it up: its reload "
                                   f"failed: {reload.error} (the next sync tries again)")
    if reload.stopped:
        click.echo(f"note: {engine.name} stopped every loaded model to take up its new config: "
                   f"{', '.join(reload.stopped)} (each loads again on its next request)",
                   err=True)
    if reload.done:
        # unchanged: an earlier sync wrote it, and the engine had not taken it up
        click.echo(f"{said} and reloaded")
    else:
        click.echo(f"{said} (engine not running, it reads it on start)")


@click.command()
@click.option("--dry-run", is_flag=True,
              help="Only print the links the bridge would make or remove; change nothing.")
def sync(dry_run: bool) -> None:
    """Link Ollama's models, rescan models and custom_models.yaml, and reload the engine if
    its config changed or it has not taken up the last one."""
    if not dry_run:
        run_sync()
        return
    settings = load_settings()
    click.echo(f"Ollama's store {settings.ollama_models} → {settings.models_dir}")
    report = run_bridge(settings, dry_run=True)
    for line in report.lines(dry_run=True):
        click.echo(line, err=line.startswith("note:"))
    click.echo(f"{len(report.created)} to link, {len(report.replaced)} to relink, "
               f"{len(report.removed)} to remove, {len(report.kept)} unchanged (dry run)")
