"""The objects every handler shares, created once per proxy process."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from services.proxy.manage.metrics import Metrics
from services.proxy.models.limits import Limits
from services.proxy.models.owner import Owner
from services.proxy.models.usage import Usage
from services.proxy.ollama.routes import OllamaModels
from services.proxy.peers.registry import Registry
from shared.catalog_holder import CatalogHolder
from shared.engines import Engine
from shared.ollama import Ollama
from shared.settings import Settings


@dataclass
class Context:
    settings: Settings
    engine: Engine
    holder: CatalogHolder
    usage: Usage
    session: aiohttp.ClientSession
    ollama: Ollama
    ollama_models: OllamaModels
    owner: Owner
    limits: Limits
    metrics: Metrics
    peers: Registry | None = None  # other stacks' models (services/proxy/peers/)


CTX = web.AppKey("ctx", Context)
