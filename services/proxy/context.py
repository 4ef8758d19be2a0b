"""The objects every handler shares, created once per proxy process."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from services.proxy.state import CatalogHolder, Usage
from shared.engines import Engine
from shared.settings import Settings


@dataclass
class Context:
    settings: Settings
    engine: Engine
    holder: CatalogHolder
    usage: Usage
    session: aiohttp.ClientSession


CTX = web.AppKey("ctx", Context)
