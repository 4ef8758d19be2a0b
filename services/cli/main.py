"""`model`: manage the stack and the models from the shell."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import click

from services.cli import stack
from services.cli.common import load_settings
from shared.engines import make_engine
from shared.sync import apply, rebuild


@click.group()
def cli() -> None:
    """model-serve: every local GGUF model on one OpenAI-compatible port."""


@cli.command()
def sync() -> None:
    """Rescan models and custom_models.yaml; reload the engine if its config changed."""
    settings = load_settings()
    engine = make_engine(settings)
    result = rebuild(settings, engine)
    if result.error:
        click.echo(result.error, err=True)
        raise click.ClickException("config not applied; the last good catalog stays in use")
    for notice in result.catalog.notices:
        click.echo(f"note: {notice}", err=True)

    async def tell_engine() -> bool:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            return await apply(result, engine, s)

    n = len(result.catalog.entries)
    if not result.engine_changed:
        click.echo(f"{n} models; engine config unchanged")
    elif asyncio.run(tell_engine()):
        click.echo(f"{n} models; engine config updated and reloaded")
    else:
        click.echo(f"{n} models; engine config updated (engine not running, it reads it on start)")


cli.add_command(stack.start)
cli.add_command(stack.stop)
cli.add_command(stack.status)


def main() -> None:
    sys.exit(cli(standalone_mode=True))
