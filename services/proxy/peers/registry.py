"""Each peer's state, asked every PEER_POLL_SECONDS: up, down or unauthorized (it refused our key),
the latency of the last poll, its models (after its filter) and their rows in its lists, which are
loaded, its room and its own estimates of the models in its /running when it tells them (a
model-serve peer), and the last error. A peer that comes back is up again at the next poll, without
a restart; config/peers.yaml is read again when it changes. A peer marked down or unauthorized ends
the requests still waiting for it (`watchers`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from shared.peers import LLAMA_SWAP, MODEL_SERVE, OLLAMA, Peer, headers, load_peers, peers_file
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")
POLL_TIMEOUT = 3.0  # one poll, all its requests
CONNECT_TIMEOUT = 4.0  # a request forwarded to a peer, until its connection is made


@dataclass
class PeerState:
    peer: Peer
    up: bool | None = None  # None: not asked yet
    latency: float | None = None  # seconds, the last poll's
    models: list[str] = field(default_factory=list)  # ids as the peer gives them
    loaded: set[str] = field(default_factory=set)
    room: int | None = None  # bytes it can still load, when it says
    needs: dict[str, int] = field(default_factory=dict)  # its own estimates, when it says
    error: str | None = None
    refused: int | None = None  # 401 or 403: it refused our key
    checked: float = 0.0
    rows: dict[str, dict] = field(default_factory=dict)  # its /v1/models rows, by id
    tags: dict[str, dict] = field(default_factory=dict)  # its /api/tags rows, by name
    # called when it is marked down: the requests to it that are under way end at once
    watchers: set[Callable[[], None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.peer.name

    def has(self, model: str) -> bool:
        return model in self.models

    @property
    def state(self) -> str:
        return "up" if self.up else "unauthorized" if self.refused else "down"

    def row(self) -> dict:
        return {**self.peer.public(), "up": bool(self.up), "state": self.state,
                "latency_ms": round(self.latency * 1000, 1) if self.latency is not None
                else None, "models": list(self.models), "loaded": sorted(self.loaded),
                "room": self.room, "error": self.error}


class Registry:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings, self.session = settings, session
        self.states: dict[str, PeerState] = {}
        self.file = peers_file(settings)
        self.read()

    def _stamp(self) -> float | None:
        try:
            return self.file.stat().st_mtime
        except OSError:
            return None

    def read(self) -> None:
        """The peers, from PEERS and config/peers.yaml as they are now: a peer whose
        settings did not change keeps its state."""
        self.stamp = self._stamp()
        peers, self.notices = load_peers(self.settings)
        for notice in self.notices:
            log.warning("peers: %s", notice)
        old = self.states
        self.states = {p.name: old[p.name] if p.name in old and old[p.name].peer == p
                       else PeerState(p) for p in peers}
        for name, state in old.items():
            if self.states.get(name) is not state:
                self._gone(state)

    def __bool__(self) -> bool:
        return bool(self.states)

    # ---- what the request path asks -------------------------------------------------------

    def named(self, name: str) -> tuple[PeerState, str] | None:
        """`<peer>/<id>`: that peer, and the model's id there."""
        head, sep, rest = name.partition("/")
        state = self.states.get(head)
        return (state, rest) if sep and state and rest else None

    def holders(self, model: str) -> list[PeerState]:
        """The peers that have the model, whether up or down (when last asked)."""
        return [s for s in self.states.values() if s.has(model)]

    def mark_down(self, state: PeerState, error: str, refused: int | None = None) -> None:
        if state.up is not False or state.refused != refused:
            log.warning("peer %s (%s) is %s: %s", state.name, state.peer.url,
                        "unauthorized" if refused else "down", error)
        state.up, state.error, state.refused = False, error, refused
        state.loaded = set()
        self._gone(state)

    @staticmethod
    def _gone(state: PeerState) -> None:
        for watcher in list(state.watchers):
            watcher()

    # ---- the poll loop --------------------------------------------------------------------

    async def follow(self) -> None:
        while True:
            try:
                if self._stamp() != self.stamp:
                    log.info("peers: %s changed, read again", self.file)
                    self.read()
                await self.poll()
            except Exception as e:  # noqa: BLE001 - no failure may end the loop
                log.warning("peers: cannot poll now: %s", e)
            await asyncio.sleep(self.settings.peer_poll_seconds)

    async def poll(self) -> None:
        await asyncio.gather(*(self._poll(s) for s in self.states.values()))

    async def _poll(self, state: PeerState) -> None:
        start = time.monotonic()
        try:
            async with asyncio.timeout(POLL_TIMEOUT):
                models, loaded, room, needs = await self._ask(state)
        except aiohttp.ClientResponseError as e:
            refused = e.status if e.status in (401, 403) else None
            self.mark_down(state, refusal(state.peer, e.status) if refused else _why(e),
                           refused)
            state.checked = time.monotonic()
            return
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError,
                AttributeError) as e:
            self.mark_down(state, _why(e))
            state.checked = time.monotonic()
            return
        if state.up is not True:
            log.info("peer %s (%s) is up: %d model(s)", state.name, state.peer.url,
                     len(models))
        state.models = [m for m in models if state.peer.wants(m)]
        state.loaded, state.room = loaded & set(state.models), room
        state.needs = {m: n for m, n in needs.items() if m in state.models}
        state.up, state.error, state.refused = True, None, None
        state.latency = state.checked = time.monotonic()
        state.latency -= start

    async def _get(self, peer: Peer, path: str):
        async with self.session.get(peer.url + path, headers=headers(peer)) as r:
            if r.status >= 400:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status,
                                                  message=f"GET {path} answered {r.status}")
            return await r.json(content_type=None)

    async def _ask(self, state: PeerState) -> tuple[list[str], set[str], int | None,
                                                    dict[str, int]]:
        """Its models, which are loaded, its room and its own estimates (when it says); its
        list rows are kept in `state`."""
        peer = state.peer
        if peer.kind == OLLAMA:
            tags, ps = await asyncio.gather(self._get(peer, "/api/tags"),
                                            self._get(peer, "/api/ps"))
            state.tags = _by(tags.get("models"), "name")
            return (list(state.tags), {m["name"] for m in ps.get("models") or []}, None, {})
        if peer.kind == MODEL_SERVE:
            listed, running, tags = await asyncio.gather(
                self._get(peer, "/v1/models"), self._get(peer, "/running"),
                self._get(peer, "/api/tags"))
            state.rows, state.tags = _by(listed.get("data"), "id"), _by(tags.get("models"), "name")
            models = list(state.rows)
            loaded = {m["id"] for m in running.get("models") or [] if m.get("state") == "loaded"}
            system = running.get("system") or {}
            room = system.get("limit", 0) - system.get("used", 0) \
                if isinstance(system.get("limit"), int) else None
            return models, loaded, room, _needs(running.get("models") or [])
        listed = await self._get(peer, "/v1/models")
        state.rows = _by(listed.get("data"), "id")
        models = list(state.rows)
        if peer.kind == LLAMA_SWAP:
            running = await self._get(peer, "/running")
            return models, {m.get("model") for m in running.get("running") or []
                            if m.get("state") == "ready"} - {None}, None, {}
        return models, set(), None, {}


def refusal(peer: Peer, status: int) -> str:
    """What a peer that refused our key is told as."""
    return f"peer {peer.name} refused our key ({status}): check its api_key"


def _by(rows: object, key: str) -> dict[str, dict]:
    """A list's rows by their id (or name): those that have one."""
    rows = rows if isinstance(rows, list) else []
    return {r[key]: r for r in rows if isinstance(r, dict) and isinstance(r.get(key), str)}


def _needs(rows: list[dict]) -> dict[str, int]:
    """A model-serve peer's own estimates, from its /running rows that have one."""
    out = {}
    for row in rows:
        need = (row.get("memory") or {}).get("estimated")
        if isinstance(need, int) and need > 0 and isinstance(row.get("id"), str):
            out[row["id"]] = need
    return out


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {POLL_TIMEOUT:g}s"
    if isinstance(e, aiohttp.ClientResponseError):
        return e.message
    return f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
