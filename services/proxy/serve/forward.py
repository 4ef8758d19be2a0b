"""The per-model routes (routes.py): check the request, find the model, stream its answer
back from the engine or Ollama."""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.harmony import route as harmony_route
from services.proxy.http import request_body
from services.proxy.models.model_turn import with_model
from services.proxy.ollama import passthrough as ollama_passthrough
from services.proxy.ollama import routes as ollama_routes
from services.proxy.peers import forward as peer_forward
from services.proxy.peers import pick
from services.proxy.serve import routes, upstream
from services.proxy.serve.engine_errors import engine_error
from services.proxy.serve.relay import MessageStart, ModelRenamer, ResponsesIndexes, relay, whole
from services.proxy.serve.routes import ANTHROPIC, FORM, QUERY, Route
from shared.catalog import Catalog, Entry, embeddings_by_ollama
from shared.errors import error_response
from shared.model_kinds import EMBEDDING, GENERATE, RERANK, kind
from shared.settings import Settings

_DROP = upstream.DROP


def _model_problem(payload: dict) -> web.Response | None:
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        return error_response(400, f"'model' must be a string, got {payload['model']!r}",
                              "invalid_type")
    if not payload.get("model"):
        return error_response(400, "'model' is required: the id of a model from "
                              "GET /v1/models", "missing_model")
    return None


def not_found(catalog: Catalog, name: str) -> web.Response:
    close = catalog.closest(name)
    hint = f"; did you mean {', '.join(close)}?" if close else "; GET /v1/models lists them"
    return error_response(404, f"model {name!r} not found{hint}", "model_not_found",
                          suggestions=close)


def ollama_target(settings: Settings, entry: Entry, path: str) -> str | None:
    """The Ollama name to send this request to, or None for the engine."""
    if entry.backend == "ollama":
        return entry.ollama
    if path == "/v1/embeddings" and embeddings_by_ollama(settings, entry):
        return entry.ollama
    return None


# "… is not an embedding model"
_KIND_NAME = {EMBEDDING: "an embedding", RERANK: "a rerank"}
# what a model that writes no text answers instead
_ANSWERS = {EMBEDDING: "/v1/embeddings, /api/embed", RERANK: "/v1/rerank"}


@dataclass
class Asked:
    """What a request asks for: the model's name as the client gave it, the body as it came,
    and, for a JSON body, the parsed object."""
    name: str
    body: bytes = b""
    payload: dict | None = None


async def _asked(request: web.Request, route: Route) -> Asked | web.Response:
    if route.model_in == QUERY:
        name = request.query.get("model")
        if not name:
            return error_response(400, f"{request.path} serves one model: name it with "
                                  "'?model=<id>' (an id from GET /v1/models)", "missing_model")
        return Asked(name)
    if route.model_in == FORM:
        body, problem = await request_body.read_raw(request)
        if problem:
            return problem
        name = request_body.form_field(body, request.headers.get("Content-Type", ""), "model")
        if not name:
            return error_response(400, f"{request.path} takes multipart/form-data with a "
                                  "'model' field: the id of a model from GET /v1/models",
                                  "missing_model")
        return Asked(name, body)
    body, payload, problem = await request_body.read(request)
    if problem or (problem := _model_problem(payload)):
        return problem
    if route.requires and not isinstance(payload.get(route.requires), list):
        return error_response(400, f"'{route.requires}' is required: a list",
                              f"missing_{route.requires}")
    return Asked(payload["model"], body, payload)


def _refusal(ctx: Context, route: Route, entry: Entry | None, target: str | None,
             name: str) -> web.Response | None:
    """Why this model cannot answer this route, before anything is loaded for it."""
    if target:
        if entry and route.needs == GENERATE and (problem := unable(ctx, route, entry, name)):
            return problem  # an embedding model Ollama serves: refused before its load
        if routes.ollama_serves(route):
            return None
        return error_response(400, f"{name} is served by Ollama, which does not answer "
                              f"{route.path} here; it answers "
                              f"{', '.join(routes.served_by_ollama())}", "unsupported_route")
    return unable(ctx, route, entry, name)


def unable(ctx: Context, route: Route, entry: Entry, name: str,
           path: str = "") -> web.Response | None:
    """A 400 when the route needs another kind of model (embeddings of a chat model, a chat
    with an embedding model)."""
    if route.needs == GENERATE:
        if (what := kind(entry.info, entry.args)) == GENERATE:
            return None
        return error_response(400, f"{name} is {_KIND_NAME[what]} model, so it does not "
                              f"answer {path or route.path}; it answers {_ANSWERS[what]}",
                              "not_chat_model")
    if route.needs and kind(entry.info, entry.args) != route.needs:
        able = sorted(e.id for e in ctx.holder.catalog.entries.values()
                      if e.backend == "engine" and kind(e.info, e.args) == route.needs)
        return error_response(400, f"{name} is not {_KIND_NAME[route.needs]} model, so it "
                              f"does not answer {path or route.path}; {route.needs} models "
                              f"served here: {', '.join(able) or 'none'}",
                              f"not_{route.needs}_model")
    return None


async def find(ctx: Context, name: str) -> Entry | None:
    """The catalog's entry for `name`. While the engine takes up a new config (the hold), a
    name not known yet may be one that config brings (a GGUF just added): asked again once
    the hold ends, rather than answered 404 while older streams finish (Ollama's own models
    do not wait)."""
    entry = await ctx.holder.resolve(name)
    if entry is None and ctx.owner.hold.holding and \
            await ctx.ollama_models.lookup(name) is None:
        await ctx.owner.hold.until_open()
        entry = await ctx.holder.resolve(name)
    return entry


async def forward(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    route = routes.of(request)
    asked = await _asked(request, route)
    if isinstance(asked, web.Response):
        return asked
    name = asked.name
    entry = await find(ctx, name)
    target = ollama_target(ctx.settings, entry, request.path) if entry else None
    if entry is None:
        target = await ctx.ollama_models.lookup(
            name, fresh=not pick.listed(ctx, request, name))
        if target is None:
            to = await pick.remote(ctx, request, name, request.path)
            if isinstance(to, pick.ToPeer):
                return await peer_forward.answer(request, to, name, route, asked.payload,
                                                 asked.body or None)
            return to or not_found(ctx.holder.catalog, name)
    if problem := _refusal(ctx, route, entry, target, name):
        return problem
    if target and asked.payload is not None and \
            (problem := ollama_routes.fixed_context(asked.payload, entry, target, request)):
        return problem
    key = ("ollama", target) if target else ("engine", entry.id)
    if to := await pick.instead(ctx, request, name, key, entry, request.path):
        return await peer_forward.answer(request, to, name, route, asked.payload,
                                         asked.body or None)
    return await with_model(request, key, entry, entry.id if entry else target,
                            lambda _: _answer(request, route, asked, entry, target))


async def _answer(request: web.Request, route: Route, asked: Asked, entry: Entry | None,
                  target: str | None) -> web.StreamResponse:
    """The one place an answer is produced, by whichever backend serves the model."""
    ctx = request.app[CTX]
    if target and route.ollama:
        return await ollama_passthrough.answer(request, ctx.ollama, route, asked.payload,
                                               target)
    if target:
        return await ollama_routes.answer(request, ctx.ollama, asked.payload, target, entry)
    if entry.harmony == "proxy" and request.path == "/v1/chat/completions":
        return await harmony_route.chat(request, asked.payload, entry)
    if asked.payload is None:  # a GET, or a form the engine gets as it came
        return await _from_engine(request, entry, asked.name, False, data=asked.body or None)
    return await to_engine(request, asked.body, asked.payload, entry)


async def to_engine(request: web.Request, body: bytes, payload: dict,
                    entry: Entry) -> web.StreamResponse:
    name = payload["model"]
    if name != entry.id:  # by its id: an engine still reading a new config knows no alias yet
        body = json.dumps({**payload, "model": entry.id}).encode()
    return await _from_engine(request, entry, name, payload.get("stream") is True, data=body)


async def _from_engine(request: web.Request, entry: Entry, name: str, streamed: bool,
                       **kwargs) -> web.StreamResponse:
    """The engine's answer to this request for `entry`, its `model` renamed to `name`."""
    ctx = request.app[CTX]
    route = routes.of(request)
    engine_name = ctx.engine.response_name(entry)
    renamer = ModelRenamer(engine_name, name) if engine_name != name else None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    headers.update(ctx.engine.headers)
    if route.model_in == QUERY:  # the router picks the model by it; a model's own server
        kwargs["params"] = {**request.query, "model": entry.id}  # takes no notice
    try:
        async with await upstream.send(ctx, request.method, entry, request.path,
                                       ctx.engine.route_url(entry, request.path), streamed,
                                       headers=headers, **kwargs) as up:
            if up.status >= 400:
                return await engine_error(up, entry.path, f"{name} {request.path}")
            if up.content_type != "text/event-stream":
                return await whole(up, renamer)
            rewriters: list = [renamer] if renamer else []
            if route.errors == ANTHROPIC:  # the one Anthropic stream, /v1/messages
                rewriters.append(MessageStart(name))
            elif route.path == "/v1/responses":
                rewriters.append(ResponsesIndexes())
            return await relay(request, up, rewriters, route, "the engine",
                               f"{entry.id} may have crashed: `model logs engine` says why")
    except aiohttp.ClientError as e:
        return upstream.failure(request, entry, e)
