"""A request sent on to a peer, with the peer's key (never ours) and the hop mark, its answer
relayed chunk by chunk (serve/relay.py), its `model` renamed to the name the client asked for (the
JSON body's, the query's or the form's `model` is the peer's id). A peer that does not answer is a
503 naming it, within CONNECT_TIMEOUT; one that the registry marks down while a request waits for it
ends that request at once (503, or a cut stream's error event)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from services.proxy.context import CTX
from services.proxy.http import request_body
from services.proxy.manage import metrics
from services.proxy.peers import pick
from services.proxy.peers.pick import ToPeer
from services.proxy.peers.registry import CONNECT_TIMEOUT, PeerState, refusal
from services.proxy.serve import upstream
from services.proxy.serve.relay import ModelRenamer, relay, whole
from services.proxy.serve.routes import ANTHROPIC_PATHS, OLLAMA, Route
from shared.errors import error_response
from shared.peers import headers

_STREAMS = ("text/event-stream", "application/x-ndjson")
# what ends a whole Ollama stream (/api/chat, /api/generate): Ollama writes no space,
# model-serve (Python's json) one
_OLLAMA_DONE = (b'"done":true', b'"done": true')


def _route(path: str, route: Route | None) -> Route:
    return route or Route(path, stream_end=_OLLAMA_DONE, errors=OLLAMA)


class _Watch:
    """Ends a request to a peer when the registry marks the peer down: one still waiting
    for the answer's headers is answered 503 at once, a stream under way is cut (its route's
    error event says why)."""

    def __init__(self, state: PeerState) -> None:
        self.state, self.fired = state, False
        self.opening: asyncio.Task | None = None
        self.up: aiohttp.ClientResponse | None = None

    def __call__(self) -> None:
        self.fired = True
        if self.up is not None:
            self.up.content.set_exception(aiohttp.ClientConnectionError(self.why()))
        elif self.opening is not None:
            self.opening.cancel()

    def why(self) -> str:
        return f"peer {self.state.name} was marked {self.state.state}: {self.state.error}"

    def __enter__(self) -> _Watch:
        self.state.watchers.add(self)
        return self

    def __exit__(self, *_) -> None:
        self.state.watchers.discard(self)


async def answer(request: web.Request, to: ToPeer, asked: str, route: Route | None,
                 payload: dict | None, body: bytes | None) -> web.StreamResponse:
    """The peer's answer to this request for `asked` (the name the client gave)."""
    with _Watch(to.state) as watch:
        return await _answer(request, to, asked, route, payload, body, watch)


async def _answer(request: web.Request, to: ToPeer, asked: str, route: Route | None,
                  payload: dict | None, body: bytes | None,
                  watch: _Watch) -> web.StreamResponse:
    ctx = request.app[CTX]
    state, peer = to.state, to.state.peer
    if turn := metrics.turn():
        turn.model, turn.backend = f"{peer.name}/{to.model}", "peer"
    sent = {k: v for k, v in request.headers.items() if k.lower() not in upstream.DROP}
    sent.update(headers(peer))
    if peer.api_key and request.path in ANTHROPIC_PATHS:
        sent["x-api-key"] = peer.api_key
    params = dict(request.query)
    if "model" in params:
        params["model"] = to.model
    if payload is not None and (body is None or payload.get("model") != to.model):
        body = json.dumps({**payload, "model": to.model}).encode()
    elif body and request.content_type == "multipart/form-data" and asked != to.model:
        body = request_body.with_form_field(body, request.headers.get("Content-Type", ""),
                                            "model", to.model)
        if body is None:
            return error_response(400, f"{request.path}: the form's 'model' field cannot be "
                                  f"read to send it to peer {peer.name}", "missing_model")
    renamer = ModelRenamer(to.model, asked) if asked != to.model else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                    connect=CONNECT_TIMEOUT,
                                    sock_read=ctx.settings.read_timeout)
    where = f"peer {peer.name} ({peer.url})"
    async def opened() -> aiohttp.ClientResponse:
        return await ctx.session.request(request.method, peer.url + request.path,
                                         params=params, data=body, headers=sent,
                                         timeout=timeout)

    try:
        watch.opening = asyncio.create_task(opened())
        try:
            up = await watch.opening
        except asyncio.CancelledError:
            if watch.fired and not asyncio.current_task().cancelling():
                return pick.down(state, asked)
            raise
        async with up:
            watch.up = up
            if watch.fired:
                return pick.down(state, asked)
            if up.status in (401, 403):
                ctx.peers.mark_down(state, refusal(peer, up.status), up.status)
                return error_response(502, f"{asked} is served by {where}: "
                                      f"{refusal(peer, up.status)}", "peer_unauthorized",
                                      peer=peer.name)
            if up.content_type not in _STREAMS:
                return await whole(up, renamer)
            return await relay(request, up, [renamer] if renamer else [],
                               _route(request.path, route), where,
                               lambda: watch.why() if watch.fired else
                               f"{where} may have stopped; its logs say why")
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        if upstream.the_client_left(request):
            raise
        ctx.peers.mark_down(state, f"{e.__class__.__name__}: {e}")
        return error_response(503, f"{asked} is served by {where}, which is not answering "
                              f"({e.__class__.__name__}); this stack's own models still "
                              "answer", "peer_unavailable", peer=peer.name)
    except aiohttp.ClientError as e:
        if upstream.the_client_left(request):
            raise
        if watch.fired:
            return pick.down(state, asked)
        return error_response(502, f"{where} broke off before it answered for {asked}: "
                              f"{e.__class__.__name__}: {e}", "peer_error", peer=peer.name)
