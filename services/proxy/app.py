"""The proxy's wiring: routes, middlewares, and the shared client session."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

import aiohttp
from aiohttp import web

from services.proxy.context import CTX, Context
from services.proxy.http.browser_guard import browser_guard, cors_headers
from services.proxy.http.error_shapes import error_shapes
from services.proxy.manage import home, info, metrics
from services.proxy.manage import models as manage
from services.proxy.manage.events import Events
from services.proxy.manage.metrics import Metrics
from services.proxy.models import measure
from services.proxy.models.limits import Limits
from services.proxy.models.owner import Owner
from services.proxy.models.usage import Usage
from services.proxy.ollama import api as ollama_api
from services.proxy.ollama.routes import OllamaModels, warning_header
from services.proxy.peers.registry import Registry
from services.proxy.serve import forward, routes
from shared import harmony_encoding
from shared.catalog_holder import CatalogHolder
from shared.engines import Engine, make_engine
from shared.errors import error_response
from shared.ollama import Ollama
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")
OPEN_PATHS = {"/health"}
PREPARED = "prepared"
IN_FLIGHT = web.AppKey("in_flight", set)
# never done by themselves (the dashboard's feed, the sync's hold): a stopping proxy does
# not wait for them
NEVER_DONE = {"/events", "/engine/hold"}


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error in the OpenAI shape clients parse: aiohttp's own (too large, no such
    route) and anything the proxy did not expect, which is logged with its traceback."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CTX].settings.max_body_bytes
        return error_response(413, f"request body too large: the limit is {limit} bytes "
                              "(MAX_BODY_BYTES)", "body_too_large")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, f"{request.method} {request.path}: {e.reason}")
    except ConnectionResetError:
        # the client went away mid-answer, as when it is cancelled: nothing to log
        raise asyncio.CancelledError from None
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        if request.get(PREPARED):  # the status line is sent: the connection just closes
            raise
        return error_response(500, f"internal error in model-serve's proxy: "
                              f"{e.__class__.__name__}: {e}; the proxy log has the details",
                              "internal_error")


def _given_key(request: web.Request) -> str:
    """`Authorization: Bearer <key>`, or Anthropic's `x-api-key: <key>`; nothing else."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":  # the scheme's name is case-insensitive (RFC 9110)
        return key.strip()
    return request.headers.get("x-api-key", "").strip()


def _dashboard_page(request: web.Request) -> bool:
    """The page's files hold no data: a browser gets them without the key, and the page then
    asks for it."""
    if request.path.startswith(home.OPEN_PREFIX):
        return True
    return request.path == "/" and request.method in ("GET", "HEAD")


@web.middleware
async def api_key(request: web.Request, handler) -> web.StreamResponse:
    key = request.app[CTX].settings.api_key
    if key and request.path not in OPEN_PATHS and not _dashboard_page(request) and \
            not hmac.compare_digest(_given_key(request).encode(), key.encode()):
        return error_response(401, "missing or wrong API key: send "
                              "'Authorization: Bearer <API_KEY>' or 'x-api-key: <API_KEY>'",
                              "invalid_api_key")
    return await handler(request)


async def _mark_prepared(request: web.Request, response: web.StreamResponse) -> None:
    request[PREPARED] = True
    if turn := metrics.turn():
        turn.sent_status = response.status
        # a stream's first byte, until relay (the engine's streams) knows its first chunk's
        # time
        if turn.first_byte is None:
            turn.first_byte = time.monotonic()


@web.middleware
async def count(request: web.Request, handler) -> web.StreamResponse:
    """Outermost, so the status counted is the one sent, whoever made it; a request that
    never reached a model (with_model names it) is not counted."""
    ctx = request.app[CTX]
    turn = ctx.metrics.begin(request.path)
    try:
        response = await handler(request)
    except web.HTTPException as e:
        ctx.metrics.finish(turn, e.status)
        raise
    except asyncio.CancelledError:
        # the client left (or the proxy stopped): once the whole answer was sent (a stream's
        # client often closes on its last event, before the handler is done) it counts as
        # answered; before that as 499, nginx's "client closed request"
        ctx.metrics.finish(turn, turn.sent_status if turn.complete and turn.sent_status
                           else 499)
        raise
    ctx.metrics.finish(turn, response.status)
    return response


@web.middleware
async def in_flight(request: web.Request, handler) -> web.StreamResponse:
    if request.path in NEVER_DONE:
        return await handler(request)
    tasks = request.app[IN_FLIGHT]
    task = asyncio.current_task()
    tasks.add(task)
    try:
        return await handler(request)
    finally:
        tasks.discard(task)


async def drain(app: web.Application) -> None:
    """On SIGTERM (a restart, `model stop`), once the proxy has stopped accepting: open
    requests and streams get DRAIN_SECONDS to finish, then the rest are ended, each stream
    with an error event. aiohttp's own shutdown would wait, but never end a handler."""
    tasks, loop = app[IN_FLIGHT], asyncio.get_running_loop()
    deadline = loop.time() + app[CTX].settings.drain_seconds
    if tasks:
        log.info("stopping: %d request(s) in flight get up to %gs to finish", len(tasks),
                 app[CTX].settings.drain_seconds)
    while tasks and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if tasks:
        log.warning("stopping: ending %d request(s) still in flight", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.wait(list(tasks), timeout=3)


def make_app(settings: Settings, engine: Engine | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[count, in_flight, error_shapes, openai_errors,
                                       browser_guard, api_key])
    app[IN_FLIGHT] = set()
    events = Events()

    async def end_feeds(app: web.Application) -> None:
        events.close()

    async def keep_contexts(app: web.Application) -> None:
        await app[CTX].owner.keep_contexts()

    app.on_shutdown.extend([end_feeds, drain, keep_contexts])
    app.on_response_prepare.extend([cors_headers, _mark_prepared, warning_header])
    engine = engine or make_engine(settings)

    async def lifecycle(app: web.Application):
        # llama-server closes a connection idle for 5 s; giving it up first means a request
        # never goes out on one the server is closing at that moment
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        # a model that sends nothing for READ_TIMEOUT has hung: its slot is freed
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=settings.read_timeout)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout,
                                  auto_decompress=False) as session,
            aiohttp.ClientSession(timeout=timeout) as ollama_session,
        ):
            holder = CatalogHolder(settings)
            await asyncio.to_thread(holder.refresh)
            try:  # read the Harmony vocabulary now, not on the first GPT-OSS request
                await asyncio.to_thread(harmony_encoding.encoding)
            except Exception as e:  # noqa: BLE001 - any failure: serve the rest, say why
                log.error("Harmony unavailable, GPT-OSS models will fail: %s", e)
            ollama = Ollama(settings.ollama_base, ollama_session)
            usage, meters = Usage(), Metrics(events)
            owner = Owner(settings, engine, session, ollama, usage, meters, holder)
            ctx = app[CTX] = Context(settings, engine, holder, usage, session, ollama,
                                     OllamaModels(ollama), owner, Limits(settings.max_queue),
                                     meters, Registry(settings, session))

            async def rows() -> list[dict]:
                return (await measure.running_models(ctx))[0]

            owner.measure = rows
            tasks = [asyncio.create_task(holder.follow()), asyncio.create_task(owner.follow()),
                     asyncio.create_task(owner.run())]
            # always: a peers.yaml written later is read on its next poll
            tasks.append(asyncio.create_task(ctx.peers.follow()))
            yield
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.cleanup_ctx.append(lifecycle)
    for route in routes.ROUTES.values():  # every per-model route: llama-server's, Ollama's
        if route.path != "/metrics":  # the stack's own without ?model=
            app.router.add_route(route.method, route.path, forward.forward)
    app.router.add_get("/metrics", manage.scrape)
    app.router.add_get("/v1/models", info.list_models)
    # ids hold `/` and `:` (`ms/gemma3:12.2b-q8_0`), sent as they are or encoded
    app.router.add_get("/v1/models/{model:.+}", info.retrieve_model)
    app.router.add_get("/health", info.health)
    app.router.add_get("/running", manage.running)
    app.router.add_post("/models/unload", manage.unload)
    app.router.add_post("/models/load", manage.load)
    app.router.add_post("/engine/hold", manage.hold_engine)
    for path in ollama_api.MODEL_ROUTES:
        app.router.add_post(path, ollama_api.model_route)
    for path, method in ollama_api.MANAGEMENT.items():
        app.router.add_route(method, path, ollama_api.management)
    app.router.add_route("HEAD", "/api/blobs/{digest}", ollama_api.management)
    app.router.add_post("/api/blobs/{digest}", ollama_api.management)
    app.router.add_get("/api/tags", ollama_api.tags)
    app.router.add_get("/api/ps", ollama_api.ps)
    app.router.add_post("/api/show", ollama_api.show_model)
    app.router.add_get("/api/version", ollama_api.version)
    home.add_routes(app)
    app.router.add_route("*", "/api/{tail:.*}", ollama_api.unknown)  # last: Ollama's 404
    return app
