"""Peers' models in this stack's lists: /v1/models and /api/tags rows marked with their
peer, a local model that peers also serve marked with their names, /running's and the
dashboard's peer rows. A down peer's models are left out (a request naming one still hears
which peer is down). A request from a peer (the hop mark) gets this stack's own models only."""

from __future__ import annotations

from aiohttp import web

from services.proxy.context import Context
from services.proxy.peers.pick import came_from_peer


def _shown(ctx: Context, request: web.Request | None) -> bool:
    return bool(ctx.peers) and not (request is not None and came_from_peer(request))


def _by_model(ctx: Context, local: set[str]) -> dict[str, list]:
    """Each up peer's models not served here → the peers that have it, in order."""
    out: dict[str, list] = {}
    for state in ctx.peers.states.values():
        if state.up:
            for model in state.models:
                if model not in local:
                    out.setdefault(model, []).append(state)
    return out


def _mark_local(ctx: Context, rows: list[dict], key: str) -> set[str]:
    names = set()
    for row in rows:
        names.add(row[key])
        holders = [s.name for s in ctx.peers.states.values() if s.up and s.has(row[key])]
        if holders:
            row["peers"] = holders
    return names


# a model-serve peer's own marks of its row, made again here
_RECOMPUTED = ("peers", "aliases", "peer")


def model_rows(ctx: Context, request: web.Request | None, data: list[dict]) -> list[dict]:
    """/v1/models' rows: `data` (this stack's), with the peers' models after them: the row
    the peer gives (created, context_length, ...), marked with the peer."""
    if not _shown(ctx, request):
        return data
    local = _mark_local(ctx, data, "id")
    out = list(data)
    for model, states in _by_model(ctx, local).items():
        own = {k: v for k, v in states[0].rows.get(model, {}).items() if k not in _RECOMPUTED}
        row = {"id": model, "object": "model", "created": 0, **own,
               "owned_by": f"peer:{states[0].name}",
               "status": "loaded" if model in states[0].loaded else "unloaded",
               "backend": "peer", "aliases": [f"{s.name}/{model}" for s in states],
               "peer": states[0].peer.public()}
        if others := [s.name for s in states[1:]]:
            row["peers"] = others  # the other peers that serve it too
        out.append(row)
    return out


def tag_rows(ctx: Context, request: web.Request, rows: list[dict]) -> list[dict]:
    """/api/tags' rows: `rows` (this stack's), with the peers' models after them: the peer's
    own /api/tags row when it gives one (model-serve, Ollama), with an extra `peer` field,
    which Ollama's clients pass over."""
    if not _shown(ctx, request):
        return rows
    local = _mark_local(ctx, rows, "name")
    blank = {"modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "",
             "details": {"format": "gguf", "family": "", "families": None,
                         "parameter_size": "", "quantization_level": ""}}
    out = list(rows)
    for model, states in _by_model(ctx, local).items():
        own = {k: v for k, v in states[0].tags.get(model, blank).items() if k != "peers"}
        out.append({**own, "name": model, "model": model, "peer": states[0].peer.public()})
    return out


def running_rows(ctx: Context) -> list[dict]:
    """/running's `peers`: each peer's name, URL, kind, up, latency, models, loaded, error."""
    return [s.row() for s in ctx.peers.states.values()] if ctx.peers else []
