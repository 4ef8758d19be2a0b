"""A stand-in for llama-swap, which cannot be installed from the registries these machines
reach. It behaves as the real one (v250) does in what model-serve relies on, and runs the real
llama-server processes its config names.

- Config: `models` (`cmd`, `proxy` default `http://localhost:${PORT}`, `ttl`, `aliases`),
  `groups`, `healthCheckTimeout` (below 15 counts as 15), `startPort` (default 5800: `${PORT}`
  counts up from it over the models in sorted-id order), `apiKeys`; `${env.NAME}` is filled in
  before the file is parsed. One bad model (a `cmd` without `${PORT}`, an alias used twice, a
  model in two groups, a negative ttl) refuses the whole file: at start it exits 1, on a reload
  the old config stays and a line is logged.
- `--watch-config`: the file's mtime and size are looked at every 2 s; a reload stops every
  running model, changed or not.
- A model is `starting` from its launch until its /health answers 200, then `ready`, and
  `stopping` while it ends.
- HTTP: `/v1/*` routed by the body's `model` (404 "no model id could be identified" for a body
  without one, 404 "no router for requested model" for an unknown one); `/upstream/<id>/...`
  (`/upstream/<id>` redirects to `/upstream/<id>/`); a command that exits at start is a 500;
  errors are JSON `{"error"}` for a client that accepts JSON, text otherwise; `/running`,
  `POST /api/models/unload[/<id>]` (an unknown id is a 404 JSON), `/v1/models`, `/health`
  (`text/plain` OK, the one route without a key). The relay to a model drops Authorization.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

ENV_MACRO = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
MACRO = re.compile(r"\$\{([A-Za-z0-9_-]+)\}")
WATCH_INTERVAL = 2.0
TTL_FROM_GLOBAL = -1  # a model's ttl default: globalTTL, which is 0 (never) unless set


class ConfigError(ValueError):
    pass


class StartError(RuntimeError):
    pass


@dataclass(frozen=True)
class Model:
    cmd: str  # with its port filled in
    proxy: str
    ttl: int


@dataclass(frozen=True)
class Config:
    models: dict[str, Model]
    aliases: dict[str, str]
    health_timeout: float
    api_keys: list[str]

    def real_id(self, name: str) -> str | None:
        return name if name in self.models else self.aliases.get(name)


def _env(match: re.Match) -> str:
    if match.group(1) not in os.environ:
        raise ConfigError(f"environment variable '{match.group(1)}' is not set")
    return os.environ[match.group(1)]


def _model(mid: str, spec: dict, port: int, global_ttl: int) -> Model:
    cmd, proxy = spec.get("cmd", ""), spec.get("proxy", "http://localhost:${PORT}")
    if "${PORT}" in proxy and "${PORT}" not in cmd:
        raise ConfigError(f"model {mid}: proxy uses ${{PORT}} but cmd does not - ${{PORT}} is "
                          "only available when used in cmd")
    ttl = int(spec.get("ttl", TTL_FROM_GLOBAL))
    ttl = global_ttl if ttl == TTL_FROM_GLOBAL else ttl
    if ttl < 0:
        raise ConfigError(f"model {mid}: invalid TTL value {ttl}")
    cmd = cmd.replace("${PORT}", str(port)).replace("${MODEL_ID}", mid)
    if unknown := MACRO.search(cmd):
        raise ConfigError(f"unknown macro '{unknown.group(0)}' found in {mid}.cmd")
    return Model(cmd, proxy.replace("${PORT}", str(port)), ttl)


def _check_groups(groups: dict) -> None:
    group_of: dict[str, str] = {}
    for gid, group in groups.items():
        for member in group.get("members") or []:
            if member in group_of:
                raise ConfigError(f"model member {member} is used in multiple groups: "
                                  f"{group_of[member]} and {gid}")
            group_of[member] = gid


def load_config(path: Path) -> Config:
    """As llama-swap loads a config: one bad model and the whole file is refused."""
    data = yaml.safe_load(ENV_MACRO.sub(_env, path.read_text())) or {}
    port, global_ttl = int(data.get("startPort", 5800)), int(data.get("globalTTL", 0))
    if port < 1:
        raise ConfigError("startPort must be greater than 1")
    models: dict[str, Model] = {}
    aliases: dict[str, str] = {}
    specs = data.get("models") or {}
    for mid in sorted(specs):
        models[mid] = _model(mid, specs[mid], port, global_ttl)
        if "${PORT}" in specs[mid].get("cmd", ""):  # only a model that uses it takes a port
            port += 1
        for alias in specs[mid].get("aliases") or []:
            if alias in aliases:
                raise ConfigError(f"duplicate alias {alias} found in model: {mid}")
            aliases[alias] = mid
    _check_groups(data.get("groups") or {})
    return Config(models, aliases, max(15.0, float(data.get("healthCheckTimeout", 120))),
                  [str(k) for k in data.get("apiKeys") or []])


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What --watch-config compares: the file's mtime and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Process:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.state = "starting"
        self.proc: asyncio.subprocess.Process | None = None
        self.last_used = time.monotonic()
        self.in_flight = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *shlex.split(self.model.cmd), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError as e:
            raise StartError(f"start() failed for command '{self.model.cmd}': {e}") from None
        await asyncio.sleep(0.25)  # as llama-swap: a moment before the first health check
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise StartError("upstream command exited prematurely")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(self.model.proxy + "/health") as r:
                    if r.status == 200:
                        self.state = "ready"
                        return
            await asyncio.sleep(0.05)
        await self.stop()
        raise StartError(f"health check timed out after {timeout:.0f}s")

    async def stop(self) -> None:
        self.state = "stopping"
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def error(request: web.Request, status: int, message: str) -> web.Response:
    """As llama-swap answers an error: JSON for a client that accepts it, text otherwise."""
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=message)


class Swap:
    def __init__(self, path: Path, config: Config) -> None:
        self.path, self.config = path, config
        self.stamp = file_stamp(path)
        self.procs: dict[str, Process] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.session: aiohttp.ClientSession | None = None

    async def ensure(self, model_id: str) -> Process:
        async with self.locks.setdefault(model_id, asyncio.Lock()):
            proc = self.procs.get(model_id)
            if proc and proc.state == "ready" and proc.alive:
                return proc
            proc = self.procs[model_id] = Process(self.config.models[model_id])
            try:
                await proc.start(self.session, self.config.health_timeout)
            except StartError:
                del self.procs[model_id]
                raise
            return proc

    async def unload(self, model_id: str) -> None:
        async with self.locks.setdefault(model_id, asyncio.Lock()):
            if proc := self.procs.get(model_id):
                await proc.stop()
                del self.procs[model_id]

    async def unload_all(self) -> None:
        await asyncio.gather(*map(self.unload, list(self.procs)))

    async def expire(self) -> None:
        """Each model's ttl, counted from its last request's end."""
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for mid, proc in list(self.procs.items()):
                if proc.state == "ready" and proc.model.ttl and not proc.in_flight \
                        and now - proc.last_used > proc.model.ttl:
                    await self.unload(mid)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            stamp = file_stamp(self.path)
            if stamp == self.stamp:
                continue
            self.stamp = stamp
            try:
                config = load_config(self.path)
            except (OSError, ValueError, yaml.YAMLError) as e:  # ConfigError is a ValueError
                print(f"config reload failed, the old config stays: {e}", flush=True)
                continue
            await self.unload_all()  # every one, changed or not
            self.config = config

    async def relay(self, request: web.Request, model_id: str, path: str,
                    body: bytes) -> web.StreamResponse:
        try:
            proc = await self.ensure(model_id)
        except StartError as e:
            return error(request, 500, f"unable to start process: {e}")
        proc.in_flight += 1
        try:
            async with self.session.request(request.method, proc.model.proxy + path, data=body,
                                            headers={"Content-Type": "application/json"}) as up:
                resp = web.StreamResponse(status=up.status)
                resp.content_type = up.content_type
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            proc.in_flight -= 1
            proc.last_used = time.monotonic()

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            name = json.loads(body).get("model")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or not name:
            return error(request, 404, "no model id could be identified")
        model_id = self.config.real_id(name)
        if model_id is None:
            return error(request, 404, "no router for requested model")
        return await self.relay(request, model_id, request.path, body)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        # Model ids may hold slashes: the shortest leading run of segments that names a model
        parts = request.match_info["tail"].split("/")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            if model_id := self.config.real_id(name):
                if i == len(parts):  # no path after the name: to its canonical form
                    target = f"/upstream/{name}/" + (f"?{request.query_string}"
                                                     if request.query_string else "")
                    redirect = web.HTTPMovedPermanently if request.method in ("GET", "HEAD") \
                        else web.HTTPPermanentRedirect
                    raise redirect(target)
                return await self.relay(request, model_id, "/" + "/".join(parts[i:]),
                                        await request.read())
        return error(request, 400, "model id required in path")

    async def running_list(self, request: web.Request) -> web.Response:
        return web.json_response({"running": [
            {"model": mid, "state": p.state, "cmd": p.model.cmd, "proxy": p.model.proxy,
             "ttl": p.model.ttl}
            for mid, p in self.procs.items() if p.state != "ready" or p.alive]})

    async def unload_one(self, request: web.Request) -> web.Response:
        model_id = self.config.real_id(request.match_info["model"])
        if model_id is None:
            return web.json_response({"error": "model not found"}, status=404)
        await self.unload(model_id)
        return web.Response(text="OK")

    async def unload_every(self, request: web.Request) -> web.Response:
        await self.unload_all()
        return web.json_response({"msg": "ok"})

    async def list_models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response({"object": "list", "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": "llama-swap"}
            for mid in sorted(self.config.models)]})


def given_key(request: web.Request) -> str:
    """As llama-swap reads it: Basic auth's password, then Bearer, then x-api-key."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        with contextlib.suppress(ValueError):
            return base64.b64decode(auth[6:]).decode().partition(":")[2]
    if auth.startswith("Bearer "):
        return auth[7:]
    return request.headers.get("x-api-key", "")


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def make_app(swap: Swap, watch: bool) -> web.Application:
    @web.middleware
    async def api_keys(request: web.Request, handler) -> web.StreamResponse:
        keys = swap.config.api_keys
        if keys and request.path != "/health" and given_key(request) not in keys:
            response = error(request, 401, "unauthorized: invalid or missing API key")
            response.headers["WWW-Authenticate"] = 'Basic realm="llama-swap"'
            return response
        return await handler(request)

    app = web.Application(client_max_size=1024**3, middlewares=[api_keys])

    async def lifecycle(app: web.Application):
        async with aiohttp.ClientSession() as session:
            swap.session = session
            tasks = [asyncio.create_task(swap.expire())]
            if watch:
                tasks.append(asyncio.create_task(swap.watch()))
            yield
            for task in tasks:
                task.cancel()
            await swap.unload_all()

    app.cleanup_ctx.append(lifecycle)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, swap.openai)
    app.router.add_route("*", "/upstream/{tail:.+}", swap.upstream)
    app.router.add_get("/running", swap.running_list)
    app.router.add_post("/api/models/unload", swap.unload_every)
    app.router.add_post("/api/models/unload/{model:.+}", swap.unload_one)
    app.router.add_get("/v1/models", swap.list_models)
    app.router.add_get("/health", healthy)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--listen", default="127.0.0.1:8080")
    ap.add_argument("--watch-config", action="store_true")
    args = ap.parse_args()
    path = Path(args.config)
    try:
        config = load_config(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        sys.exit(f"Error loading config: {e}")
    host, _, port = args.listen.rpartition(":")
    web.run_app(make_app(Swap(path, config), args.watch_config), host=host or "0.0.0.0",
                port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
