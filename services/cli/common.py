"""Helpers every `model` subcommand uses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import click

from shared import settings as settings_mod
from shared.catalog import Catalog
from shared.ollama import Ollama, OllamaError, OllamaUnavailable
from shared.sync import load_last_good

T = TypeVar("T")


def load_settings() -> settings_mod.Settings:
    try:
        return settings_mod.load()
    except settings_mod.SettingsError as e:
        raise click.ClickException(f"bad setting: {e}") from None


def load_catalog(settings: settings_mod.Settings) -> Catalog:
    catalog = load_last_good(settings)
    if catalog is None:
        raise click.ClickException("no catalog yet: run `model sync` or `model start`")
    return catalog


def with_ollama(settings: settings_mod.Settings, work: Callable[[Ollama], Awaitable[T]]) -> T:
    """Run `work` against Ollama; its failures become one clear line and exit code 1."""

    async def go() -> T:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await work(Ollama(settings.ollama_base, session))

    try:
        return asyncio.run(go())
    except (OllamaUnavailable, OllamaError) as e:
        raise click.ClickException(str(e)) from None


def matching(names: list[str], text: str | None) -> list[str]:
    return [n for n in names if not text or text.lower() in n.lower()]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
