"""What every engine adapter provides."""

from __future__ import annotations

import re
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from shared.catalog import Catalog, Entry
from shared.engine_key import engine_key
from shared.files import write_if_changed
from shared.llama_server import find_llama_server
from shared.model_flags import Option
from shared.model_kinds import EMBEDDING, FLAGS, RERANK, kind
from shared.settings import Settings


class EngineError(RuntimeError):
    pass


class EngineStarting(EngineError):
    """The engine answered 503: llama-server's "Loading model" while it starts (a restart
    under way), which a retry finds up."""


@dataclass(frozen=True)
class Running:
    state: str  # "loaded" or "loading"
    port: int | None  # of the model's own llama-server, to measure its memory


def served(catalog: Catalog) -> list[Entry]:
    return [e for e in catalog.entries.values() if e.backend == "engine" and (e.path or e.cmd)]


def model_options(entry: Entry) -> list[Option]:
    """llama-server options for one model, after the ones the engine owns."""
    options = [["--ctx-size", str(entry.ctx_size)], ["--parallel", str(entry.parallel)]]
    if entry.mmproj:
        options.append(["--mmproj", entry.mmproj])
    # without its flag llama-server refuses an embedding model /v1/embeddings, and a
    # reranker /v1/rerank; one given in custom_models.yaml stands
    flag = {EMBEDDING: "--embeddings", RERANK: "--reranking"}.get(kind(entry.info))
    if flag and not FLAGS.keys() & set(entry.args):
        options.append([flag])
    if entry.rpc:
        options.append(["--rpc", ",".join(entry.rpc)])
    return options + entry.options


def shown(option: Option) -> str:
    """An option for a notice: its values quoted, a line break as `\\n`."""
    return " ".join([option[0], *map(repr, option[1:])])


def section_name(model_id: str) -> str:
    """A name the router keeps as it is (it rewrites `repo:tag`-looking names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


class Engine(ABC):
    name: str
    # whether a reload stops every loaded model, changed or not: the proxy holds requests
    # for them while it takes up a new config (services/proxy/models/engine_hold.py)
    reload_unloads_all = False
    # whether a request for a model the engine does not run starts it (llama-swap's does;
    # the router runs --no-models-autoload): the proxy then sends such requests none
    starts_on_request = False
    # what the engine gets when the service that started it dies without stopping it:
    # SIGTERM lets it stop the models it started
    death_signal = signal.SIGTERM

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.engine_url
        self.key = engine_key(settings)
        # on every request to the engine, and to a model's own llama-server
        self.headers = {"Authorization": f"Bearer {self.key}"}

    @property
    @abstractmethod
    def config_path(self) -> Path: ...

    @abstractmethod
    def render(self, catalog: Catalog) -> str:
        """The engine's config for the catalog, without the entries it refuses; identical
        input gives identical text."""

    @abstractmethod
    def refusals(self, catalog: Catalog) -> dict[str, str]:
        """Entry id → why this engine cannot serve it, and what to change."""

    @abstractmethod
    def left_out(self, catalog: Catalog) -> dict[str, list[str]]:
        """Entry id → each value of its settings this engine's config cannot hold, and why;
        the engine serves the entry without them (refused entries are not in it)."""

    def accepted(self, catalog: Catalog) -> list[Entry]:
        refused = self.refusals(catalog)
        return [entry for entry in served(catalog) if entry.id not in refused]

    def config_changes(self, catalog: Catalog) -> bool:
        """Whether write_config would change the file."""
        try:
            return self.config_path.read_text() != self.render(catalog)
        except OSError:
            return True

    def write_config(self, catalog: Catalog) -> bool:
        """Writes the config for the catalog; whether the file changed."""
        return write_if_changed(self.config_path, self.render(catalog))

    @abstractmethod
    def command(self) -> list[str]: ...

    def environment(self) -> dict[str, str]:
        return {}

    def unreachable(self) -> str:
        return (f"the engine at {self.url} is not reachable: in a running stack it is "
                "restarting (`model status` shows it); otherwise start the stack with "
                "`make up` or `model start`")

    def route_url(self, entry: Entry, path: str) -> str:
        """One of the model's llama-server routes, through the engine (the router picks the
        model by the body's `model`, or by `?model=` on a GET)."""
        return self.url + path

    def completion_url(self, entry: Entry) -> str:
        """llama-server's raw /completion endpoint for this model (Harmony goes there)."""
        return self.route_url(entry, "/completion")

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
        async with session.request(method, self.url + path, headers=self.headers,
                                   **kwargs) as resp:
            text = await resp.text()
            if resp.status >= 400:
                error = EngineStarting if resp.status == 503 else EngineError
                raise error(f"{self.name} {method} {path}: HTTP {resp.status}: {text[:500]}")
            if resp.content_type == "application/json":
                return await resp.json()
            return text
