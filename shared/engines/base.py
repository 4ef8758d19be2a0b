"""What every engine adapter provides."""

from __future__ import annotations

import re
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from shared.catalog import Catalog, Entry
from shared.llama_server import find_llama_server
from shared.settings import Settings

# Flags the engine sets itself for each model; a `cmd` override must not fight it over them.
ENGINE_OWNED = {"--host", "--port", "-m", "--model", "-a", "--alias"}


class EngineError(RuntimeError):
    pass


@dataclass(frozen=True)
class Running:
    state: str  # "loaded" or "loading"
    port: int | None  # of the model's own llama-server, to measure its memory


def served(catalog: Catalog) -> list[Entry]:
    return [e for e in catalog.entries.values() if e.backend == "engine" and (e.path or e.cmd)]


def model_args(entry: Entry) -> list[str]:
    """llama-server arguments for one model, after the ones the engine owns."""
    if entry.cmd:
        words = shlex.split(entry.cmd.replace("${MODEL_PATH}", entry.path))[1:]
        out: list[str] = []
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ENGINE_OWNED:
                skip = True
            else:
                out.append(word)
        return out
    args = ["--ctx-size", str(entry.ctx_size), "--parallel", str(entry.parallel)]
    if entry.mmproj:
        args += ["--mmproj", entry.mmproj]
    if entry.info.get("pooling_type"):  # an embedding model answers /v1/embeddings
        args.append("--embeddings")
    return args + entry.args


def section_name(model_id: str) -> str:
    """A name the router keeps as it is (it rewrites `repo:tag`-looking names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


class Engine(ABC):
    name: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.engine_url

    @property
    @abstractmethod
    def config_path(self) -> Path: ...

    @abstractmethod
    def render(self, catalog: Catalog) -> str:
        """The engine's config for the catalog; identical input gives identical text."""

    @abstractmethod
    def command(self) -> list[str]: ...

    def environment(self) -> dict[str, str]:
        return {}

    def unreachable(self) -> str:
        return (f"the engine at {self.url} is not reachable; start the stack with `make up` or "
                "`model start`, or check `model status`")

    def completion_url(self, entry: Entry) -> str:
        """llama-server's raw /completion endpoint for this model (Harmony goes there)."""
        return self.url + "/completion"

    @abstractmethod
    def response_name(self, entry: Entry) -> str:
        """The `model` the engine writes into its responses for this entry."""

    @abstractmethod
    async def running(self, session: aiohttp.ClientSession,
                      catalog: Catalog) -> dict[str, Running]:
        """Catalog id → state and port of each model the engine holds."""

    async def loaded(self, session: aiohttp.ClientSession, catalog: Catalog) -> dict[str, str]:
        return {mid: r.state for mid, r in (await self.running(session, catalog)).items()}

    @abstractmethod
    async def load(self, session: aiohttp.ClientSession, entry: Entry) -> None:
        """Returns once the model is loaded; EngineError with the reason when it fails."""

    @abstractmethod
    async def unload(self, session: aiohttp.ClientSession, entry: Entry) -> None: ...

    @abstractmethod
    async def arguments(self, session: aiohttp.ClientSession, entry: Entry) -> list[str]:
        """The command line the engine runs this model with."""

    @abstractmethod
    async def reload(self, session: aiohttp.ClientSession) -> None:
        """Pick up a rewritten config, keeping unchanged loaded models loaded where it can."""

    def llama_server(self) -> str:
        return find_llama_server(self.settings)

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    **kwargs) -> dict | str:
        async with session.request(method, self.url + path, **kwargs) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise EngineError(f"{self.name} {method} {path}: HTTP {resp.status}: {text[:500]}")
            if resp.content_type == "application/json":
                return await resp.json()
            return text
