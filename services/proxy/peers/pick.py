"""Which serves a request: this stack, or a peer. A model served here stays here unless it cannot
start here now (admission would wait); then a peer that has it loaded, else one that tells it has
room for it (its own estimate of the model when it gives one, else ours). A model only peers have
goes to one of them (loaded first); `<peer>/<id>` for a model that peer does not list is a 404 here.
A request that came from a peer (the hop mark) is never sent on."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from aiohttp import web

from services.proxy.context import Context
from services.proxy.peers.registry import PeerState
from shared.errors import error_response
from shared.loading import Key
from shared.peers import HOP, LLAMA_SWAP, MODEL_SERVE, OLLAMA, OPENAI

# The Ollama routes served here that a peer of the kind answers too.
OLLAMA_NATIVE = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
# what llama-swap v250 routes by the model a request names (its /v1/messages and
# /v1/responses pass to the model's llama-server as they are)
_LLAMA_SWAP = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
               "/v1/messages/count_tokens", "/v1/responses", "/v1/rerank", "/v1/reranking",
               "/rerank", "/infill", "/completion", "/v1/audio/transcriptions")
_OLLAMA = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
           "/v1/responses", *OLLAMA_NATIVE)


def answers(kind: str, path: str) -> bool:
    """Whether a peer of `kind` answers `path` for its models."""
    if kind == MODEL_SERVE:
        return True
    if kind == LLAMA_SWAP:
        return path in _LLAMA_SWAP
    if kind == OLLAMA:
        return path in _OLLAMA
    return kind == OPENAI and path.startswith("/v1/")


def _answered(kind: str) -> str:
    from services.proxy.serve.routes import ROUTES  # the route table, for the message
    paths = [p for p in (*ROUTES, *OLLAMA_NATIVE) if answers(kind, p)]
    return ", ".join(paths)


@dataclass
class ToPeer:
    state: PeerState
    model: str  # the model's id on the peer


def came_from_peer(request: web.Request) -> bool:
    return HOP in request.headers


def _best(states: list[PeerState], model: str) -> PeerState | None:
    up = [s for s in states if s.up]
    loaded = [s for s in up if model in s.loaded]
    return (loaded or up or [None])[0]


def down(state: PeerState, name: str) -> web.Response:
    why = f": {state.error}" if state.refused else \
        f", which is not answering: {state.error or 'down'}"
    return error_response(503, f"{name} is served by peer {state.name} ({state.peer.url})"
                          f"{why}; this stack's own models still answer", "peer_unavailable",
                          peer=state.name, state=state.state)


def _unknown(state: PeerState, name: str, model: str) -> web.Response:
    """`<peer>/<id>` for a model the peer does not list: what it has, closest first."""
    close = difflib.get_close_matches(model, state.models, 3, 0.3) or state.models[:3]
    has = f"; it serves {len(state.models)} model(s), such as {', '.join(close)}" \
        if close else "; it serves no model here"
    return error_response(404, f"{name}: peer {state.name} ({state.peer.url}) has no model "
                          f"{model!r}{has}", "model_not_found", peer=state.name)


def _unanswered(state: PeerState, name: str, path: str) -> web.Response:
    kind = state.peer.kind
    article = "an" if kind[0] in "aeiou" else "a"
    return error_response(400, f"{name} is served by peer {state.name}, {article} {kind} "
                          f"server, which does not answer {path}; it answers "
                          f"{_answered(state.peer.kind)}", "unsupported_route",
                          peer=state.name)


def listed(ctx: Context, request: web.Request, name: str) -> bool:
    """Whether a peer this request may go to lists `name`."""
    registry = ctx.peers
    return bool(registry) and not came_from_peer(request) and \
        bool(registry.named(name) or registry.holders(name))


async def remote(ctx: Context, request: web.Request, name: str,
                 path: str) -> ToPeer | web.Response | None:
    """For a model not served here: the peer to send it to, an error (its peer is down, or
    does not answer the route), or None (no peer has it)."""
    registry = ctx.peers
    if not registry or came_from_peer(request):
        return None
    if named := registry.named(name):
        state, model = named
        if state.up and not state.has(model):  # its list is known: not sent on
            return _unknown(state, name, model)
        holders = [state]
    else:
        model, holders = name, registry.holders(name)
    if not holders:
        return None
    state = _best(holders, model)
    if state is None:
        return down(holders[0], name)
    if not answers(state.peer.kind, path):
        return _unanswered(state, name, path)
    return ToPeer(state, model)


async def instead(ctx: Context, request: web.Request, name: str, key: Key, entry,
                  path: str) -> ToPeer | None:
    """For a model served here: a peer to serve it instead, when it cannot start here now
    and an up peer has it loaded, or has room for it: the peer's own estimate of the model
    (its /running row), else this stack's, fits in the room it tells."""
    registry = ctx.peers
    if not registry or came_from_peer(request):
        return None
    holders = [s for s in registry.holders(name) if s.up and answers(s.peer.kind, path)]
    if not holders or await ctx.owner.starts_now(key, entry):
        return None
    loaded = [s for s in holders if name in s.loaded]
    need = ctx.owner.estimate(key, entry)
    roomy = [s for s in holders
             if s.room is not None and s.room > 0 and s.needs.get(name, need) <= s.room]
    state = (loaded or roomy or [None])[0]
    return ToPeer(state, name) if state else None
