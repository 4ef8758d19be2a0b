"""A stand-in for llama-swap, which cannot be installed from the registries these machines
reach. It follows llama-swap's documented behaviour and HTTP API for what model-serve uses:
`--config`, `--listen`, `--watch-config` (running models restart when the file changes),
models with `cmd` (${PORT} macro), `ttl` and `aliases`, `apiKeys` (${env.NAME} substituted;
Authorization stripped before the relay); `/v1/*` routed by the body's `model`,
`/upstream/<id>/...`, `/running`, `POST /api/models/unload/<id>`, `/v1/models`, `/health`.
It runs the real llama-server processes the config names.
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
import socket
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

ENV_MACRO = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, model_id: str, cmd: str, ttl: int) -> None:
        self.model_id, self.cmd, self.ttl = model_id, cmd, ttl
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.last_used = time.monotonic()
        self.in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> None:
        argv = shlex.split(self.cmd.replace("${PORT}", str(self.port)))
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"upstream command exited with {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("health check timed out")

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Swap:
    def __init__(self, config: Path, watch: bool) -> None:
        self.config_path, self.watch = config, watch
        self.models: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.health_timeout = 120.0
        self.running: dict[str, Process] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.stamp = 0
        self.session: aiohttp.ClientSession | None = None
        self.api_keys: list[str] = []

    def read_config(self) -> None:
        # llama-swap substitutes ${env.NAME} in the text before parsing it
        text = ENV_MACRO.sub(lambda m: os.environ[m.group(1)], self.config_path.read_text())
        data = yaml.safe_load(text) or {}
        self.api_keys = [str(k) for k in data.get("apiKeys") or []]
        self.health_timeout = float(data.get("healthCheckTimeout", 120))
        self.models = data.get("models") or {}
        self.aliases = {a: mid for mid, m in self.models.items() for a in m.get("aliases", [])}
        self.stamp = os.stat(self.config_path).st_mtime_ns

    def real_id(self, name: str) -> str | None:
        return name if name in self.models else self.aliases.get(name)

    async def ensure(self, model_id: str) -> Process:
        async with self.locks.setdefault(model_id, asyncio.Lock()):
            proc = self.running.get(model_id)
            if proc and proc.proc and proc.proc.returncode is None:
                return proc
            m = self.models[model_id]
            proc = Process(model_id, m["cmd"], int(m.get("ttl", 0)))
            await proc.start(self.session, self.health_timeout)
            self.running[model_id] = proc
            return proc

    async def unload(self, model_id: str) -> None:
        proc = self.running.pop(model_id, None)
        if proc:
            await proc.stop()

    async def housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for mid, proc in list(self.running.items()):
                if proc.ttl and not proc.in_flight and now - proc.last_used > proc.ttl:
                    await self.unload(mid)
            if self.watch and os.stat(self.config_path).st_mtime_ns != self.stamp:
                self.read_config()
                for mid in list(self.running):  # llama-swap restarts running models
                    await self.unload(mid)

    async def relay(self, request: web.Request, model_id: str, path: str,
                    body: bytes) -> web.StreamResponse:
        try:
            proc = await self.ensure(model_id)
        except RuntimeError as e:
            return web.json_response({"error": f"unable to start process: {e}"}, status=502)
        proc.in_flight += 1
        try:
            async with self.session.request(request.method, proc.url + path, data=body,
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
            name = json.loads(body).get("model", "")
        except (ValueError, AttributeError):
            return web.Response(status=400, text="invalid JSON")
        model_id = self.real_id(name)
        if model_id is None:
            return web.Response(status=400, text=f"could not find real modelID for {name}")
        return await self.relay(request, model_id, request.path, body)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        # Model ids may hold slashes: the longest known name the path starts with wins.
        tail = request.match_info["tail"]
        names = sorted([*self.models, *self.aliases], key=len, reverse=True)
        name = next((n for n in names if tail == n or tail.startswith(n + "/")), None)
        if name is None:
            return web.Response(status=404, text="model id required in path")
        return await self.relay(request, self.real_id(name), tail[len(name):] or "/",
                                await request.read())

    async def running_list(self, request: web.Request) -> web.Response:
        return web.json_response({"running": [
            {"model": mid, "state": "ready", "cmd": p.cmd, "proxy": p.url, "ttl": p.ttl}
            for mid, p in self.running.items()]})

    async def unload_one(self, request: web.Request) -> web.Response:
        model_id = self.real_id(request.match_info["model"])
        if model_id is None:
            return web.Response(status=404, text="model not found")
        await self.unload(model_id)
        return web.Response(text="OK")

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": mid, "object": "model", "owned_by": "llama-swap"} for mid in self.models]})


def given_key(request: web.Request) -> str:
    """As llama-swap reads it: Basic auth's password, then Bearer, then x-api-key."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        with contextlib.suppress(ValueError):
            return base64.b64decode(auth[6:]).decode().partition(":")[2]
    if auth.startswith("Bearer "):
        return auth[7:]
    return request.headers.get("x-api-key", "")


def make_app(swap: Swap) -> web.Application:
    @web.middleware
    async def api_keys(request: web.Request, handler) -> web.StreamResponse:
        # With apiKeys set, every route but /health wants one; the relay to a model's own
        # llama-server sends no Authorization (llama-swap strips it).
        if swap.api_keys and request.path != "/health" and \
                given_key(request) not in swap.api_keys:
            return web.Response(status=401, text="unauthorized: invalid or missing API key",
                                headers={"WWW-Authenticate": 'Basic realm="llama-swap"'})
        return await handler(request)

    app = web.Application(client_max_size=1024**3, middlewares=[api_keys])

    async def lifecycle(app: web.Application):
        swap.read_config()
        async with aiohttp.ClientSession() as session:
            swap.session = session
            task = asyncio.create_task(swap.housekeeping())
            yield
            task.cancel()
            for mid in list(swap.running):
                await swap.unload(mid)

    app.cleanup_ctx.append(lifecycle)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, swap.openai)
    app.router.add_route("*", "/upstream/{tail:.*}", swap.upstream)
    app.router.add_get("/running", swap.running_list)
    app.router.add_post("/api/models/unload/{model:.*}", swap.unload_one)
    app.router.add_get("/v1/models", swap.list_models)
    app.router.add_get("/health", lambda r: web.Response(text="OK"))
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--listen", default="127.0.0.1:8080")
    ap.add_argument("--watch-config", action="store_true")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(make_app(Swap(Path(args.config), args.watch_config)), host=host or "0.0.0.0",
                port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
