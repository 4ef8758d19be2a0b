"""Helpers every `model` subcommand uses."""

from __future__ import annotations

import click

from shared import settings as settings_mod


def load_settings() -> settings_mod.Settings:
    try:
        return settings_mod.load()
    except settings_mod.SettingsError as e:
        raise click.ClickException(f"bad setting: {e}") from None
