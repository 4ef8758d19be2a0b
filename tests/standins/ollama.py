"""A stand-in for Ollama, which cannot be installed from the registries these machines reach.

It keeps a real on-disk store in Ollama's layout (manifests/<registry>/<namespace>/<model>/
<tag>, blobs/sha256-<hex>) and implements the API subset model-serve uses, following
Ollama's documented shapes: /api/tags, /api/ps, /api/show, /api/pull (streamed progress;
writes the blob, config and manifest, manifest last), /api/delete, /api/chat, /api/generate
(keep_alive 0 unloads), /api/embed, /api/version, and the Anthropic and OpenAI Responses
compatibility routes /v1/messages and /v1/responses (ollama_compat.py). Pulled models are
tiny generated GGUF files; a name containing "safetensors" pulls a non-GGUF blob, one
containing "vision" also gets a projector layer. Replies are deterministic; GET
/_standin/requests shows what arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from aiohttp import web

from shared.gguf_header import read_header
from shared.tiny_gguf import write_model
from tests.standins import ollama_compat
from tests.standins.ollama_compat import reply

DEFAULT_REGISTRY = "registry.ollama.ai"


def split_name(name: str) -> tuple[str, str, str, str]:
    base, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = base.split("/")
    if len(parts) == 1:
        return DEFAULT_REGISTRY, "library", parts[0], tag
    if len(parts) == 2:
        return DEFAULT_REGISTRY, parts[0], parts[1], tag
    return parts[0], "/".join(parts[1:-1]), parts[-1], tag


def full_name(name: str) -> str:
    """The name as Ollama reports it; `registry.ollama.ai/library/x:1` is just `x:1`."""
    registry, namespace, model, tag = split_name(name)
    if registry == DEFAULT_REGISTRY:
        base = model if namespace == "library" else f"{namespace}/{model}"
    else:
        base = f"{registry}/{namespace}/{model}"
    return f"{base}:{tag}"


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "manifests").mkdir(parents=True, exist_ok=True)

    def manifest_path(self, name: str) -> Path:
        registry, namespace, model, tag = split_name(name)
        return self.root / "manifests" / registry / namespace / model / tag

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest.replace(":", "-")

    def put_blob(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    def manifests(self) -> list[tuple[str, Path]]:
        out = []
        for path in sorted((self.root / "manifests").rglob("*")):
            if path.is_file():
                *base, model, tag = path.relative_to(self.root / "manifests").parts
                out.append((full_name("/".join([*base, model]) + ":" + tag), path))
        return out

    def read(self, name: str) -> dict | None:
        path = self.manifest_path(full_name(name))
        return json.loads(path.read_text()) if path.is_file() else None

    def config(self, manifest: dict) -> dict:
        return json.loads(self.blob(manifest["config"]["digest"]).read_text())

    def model_digest(self, manifest: dict) -> str:
        return next(la["digest"] for la in manifest["layers"]
                    if la["mediaType"] == "application/vnd.ollama.image.model")


class Ollama:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.loaded: dict[str, float] = {}
        self.requests: list[dict] = []

    def details(self, manifest: dict) -> dict:
        c = self.store.config(manifest)
        return {"parent_model": "", "format": c.get("model_format", "gguf"),
                "family": c.get("model_family", ""), "families": c.get("model_families"),
                "parameter_size": c.get("model_type", ""),
                "quantization_level": c.get("file_type", "")}

    async def tags(self, request: web.Request) -> web.Response:
        models = []
        for name, path in self.store.manifests():
            manifest = json.loads(path.read_text())
            size = sum(la["size"] for la in manifest["layers"])
            models.append({"name": name, "model": name, "size": size,
                           "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
                           "modified_at": datetime.fromtimestamp(path.stat().st_mtime, UTC)
                           .isoformat(), "details": self.details(manifest)})
        return web.json_response({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for name, expires in self.loaded.items():
            manifest = self.store.read(name)
            if manifest is None:
                continue
            size = sum(la["size"] for la in manifest["layers"])
            models.append({"name": name, "model": name, "size": size, "size_vram": 0,
                           "digest": "", "details": self.details(manifest),
                           "expires_at": datetime.fromtimestamp(expires, UTC).isoformat()})
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        manifest = self.store.read(body.get("model") or body.get("name", ""))
        if manifest is None:
            return web.json_response({"error": "model not found"}, status=404)
        return web.json_response({"details": self.details(manifest), "parameters": "",
                                  "template": "{{ .Prompt }}", "capabilities": ["completion"],
                                  "model_info": {"general.architecture": "llama"}})

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        raw = body.get("model") or body.get("name", "")
        if "missing" in raw:
            return web.json_response(
                {"error": "pull model manifest: file does not exist"}, status=500)
        name = full_name(raw)
        resp = web.StreamResponse()
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)

        async def say(**item) -> None:
            await resp.write(json.dumps(item).encode() + b"\n")

        await say(status="pulling manifest")
        seed = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
        with tempfile.TemporaryDirectory() as tmp:
            if "safetensors" in name:
                data = b'{"__metadata__": {}}' + b"\0" * 64
                params, quant, fmt = "1M", "F16", "safetensors"
            else:
                path = write_model(Path(tmp) / "m.gguf", name=name, seed=seed % 1000)
                data = path.read_bytes()
                params, quant, fmt = human(read_header(path).param_count), "F32", "gguf"
            digest, size = self.store.put_blob(data)
            for done in (0, size // 2, size):
                await say(status=f"pulling {digest[7:19]}", digest=digest, total=size,
                          completed=done)
                await asyncio.sleep(0.01)
            layers = [{"mediaType": "application/vnd.ollama.image.model",
                       "digest": digest, "size": size}]
            if "vision" in name:
                proj = write_model(Path(tmp) / "p.gguf", name="projector", seed=seed % 7 + 1)
                pdigest, psize = self.store.put_blob(proj.read_bytes())
                layers.append({"mediaType": "application/vnd.ollama.image.projector",
                               "digest": pdigest, "size": psize})
        config = {"model_format": fmt, "model_family": "llama", "model_families": ["llama"],
                  "model_type": params, "file_type": quant}
        cdigest, csize = self.store.put_blob(json.dumps(config).encode())
        await say(status="verifying sha256 digest")
        await say(status="writing manifest")
        mpath = self.store.manifest_path(name)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.write_text(json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": cdigest, "size": csize},
            "layers": layers}))
        await say(status="success")
        await resp.write_eof()
        return resp

    async def delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("model") or body.get("name", "")
        path = self.store.manifest_path(full_name(name))
        if not path.is_file():
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        path.unlink()
        referenced = set()
        for _, other in self.store.manifests():
            m = json.loads(other.read_text())
            referenced |= {m["config"]["digest"], *(la["digest"] for la in m["layers"])}
        for blob in (self.store.root / "blobs").iterdir():
            if blob.name.replace("-", ":", 1) not in referenced:
                blob.unlink()
        self.loaded.pop(full_name(name), None)
        return web.Response()

    def _use(self, name: str, keep_alive) -> str | None:
        full = full_name(name)
        if self.store.read(full) is None:
            return None
        if keep_alive in (0, "0", "0s"):
            self.loaded.pop(full, None)
        else:
            self.loaded[full] = time.time() + 300
        return full

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": "/api/chat", **body})
        full = self._use(body.get("model", ""), body.get("keep_alive"))
        if full is None:
            return web.json_response({"error": f"model '{body.get('model')}' not found"},
                                     status=404)
        text, thinking, calls, counts = reply(full, body.get("messages", []),
                                              body.get("tools") or [])
        done = {"model": full, "created_at": datetime.now(UTC).isoformat(), "done": True,
                "done_reason": "stop", **counts}
        if not body.get("stream", True):
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            return web.json_response({**done, "message": message})
        resp = web.StreamResponse()
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)
        pieces = ([{"role": "assistant", "content": "", "thinking": thinking}] if thinking
                  else [])
        pieces += [{"role": "assistant", "content": w + " "} for w in text.split()]
        pieces += [{"role": "assistant", "content": "", "tool_calls": [c]} for c in calls]
        for message in pieces:
            await resp.write(json.dumps({"model": full, "message": message,
                                         "done": False}).encode() + b"\n")
            await asyncio.sleep(0.005)
        await resp.write(json.dumps({**done, "message": {"role": "assistant",
                                                          "content": ""}}).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": "/api/generate", **body})
        full = self._use(body.get("model", ""), body.get("keep_alive"))
        if full is None:
            return web.json_response({"error": "model not found"}, status=404)
        unloading = full not in self.loaded
        return web.json_response({"model": full, "response": "" if unloading else "ok",
                                  "done": True, "done_reason": "unload" if unloading
                                  else "stop"})

    async def embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": "/api/embed", **body})
        full = self._use(body.get("model", ""), body.get("keep_alive"))
        if full is None:
            return web.json_response({"error": "model not found"}, status=404)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [[b / 255 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in inputs]
        return web.json_response({"model": full, "embeddings": vectors,
                                  "prompt_eval_count": sum(len(t.split()) for t in inputs)})

    async def seen(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)


def make_app(root: Path) -> web.Application:
    o = Ollama(Store(root))
    app = web.Application()
    app.router.add_get("/api/tags", o.tags)
    app.router.add_get("/api/ps", o.ps)
    app.router.add_post("/api/show", o.show)
    app.router.add_post("/api/pull", o.pull)
    app.router.add_delete("/api/delete", o.delete)
    app.router.add_post("/api/chat", o.chat)
    app.router.add_post("/api/generate", o.generate)
    app.router.add_post("/api/embed", o.embed)
    app.router.add_post("/v1/messages", partial(ollama_compat.messages, o))
    app.router.add_post("/v1/responses", partial(ollama_compat.responses, o))
    # 0.14: the first with /v1/messages (and /v1/responses, from 0.13.3), which it answers
    app.router.add_get("/api/version", lambda r: web.json_response({"version": "0.14.0"}))
    app.router.add_get("/_standin/requests", o.seen)
    app.router.add_get("/", lambda r: web.Response(text="Ollama is running"))
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--port", type=int, default=11434)
    args = ap.parse_args()
    web.run_app(make_app(args.models), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
