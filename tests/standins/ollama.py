"""A stand-in for Ollama's pulls, which the real Ollama (tests/real_ollama.py) cannot make
without the internet: `model pull`'s progress, and the bench's pulls.

It keeps a real on-disk store in Ollama's layout (manifests/<registry>/<namespace>/<model>/
<tag>, blobs/sha256-<hex>) and answers the routes a stack asks of Ollama while pulling as the
real Ollama 0.33 does (../shared/tools/real-engines/ollama-recorded, checked by
tests/test_ollama_standin.py): /api/pull (streamed progress; writes the blob, config and
manifest, manifest last; a name holding "missing" fails as an offline pull does), /api/tags,
/api/ps (nothing is ever loaded here), /api/delete, /api/version, `/`. Pulled models are
tiny generated GGUF files.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from shared.gguf_header import read_header
from shared.tiny_gguf import write_model

DEFAULT_REGISTRY = "registry.ollama.ai"
VERSION = "0.33.0-rc2"  # the real Ollama the answers here were recorded from


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
    """A parameter count as Ollama writes it: 164544 → 165K, 1.5e9 → 1.5B."""
    if n < 1e6:
        return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)
    unit, size = ("B", 1e9) if n >= 1e9 else ("M", 1e6)
    return f"{n / size:.1f}".removesuffix(".0") + unit


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


class Ollama:
    def __init__(self, store: Store) -> None:
        self.store = store

    def row(self, name: str, path: Path) -> dict:
        """An /api/tags row, as 0.33 writes it."""
        manifest = json.loads(path.read_text())
        config = json.loads(self.store.blob(manifest["config"]["digest"]).read_text())
        model = next(la for la in manifest["layers"]
                     if la["mediaType"] == "application/vnd.ollama.image.model")
        info = read_header(self.store.blob(model["digest"]))
        size = manifest["config"]["size"] + sum(la["size"] for la in manifest["layers"])
        return {"name": name, "model": name,
                "modified_at": datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(),
                "size": size, "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
                "details": {"parent_model": "", "format": config["model_format"],
                            "family": config["model_family"],
                            "families": config["model_families"],
                            "parameter_size": config["model_type"],
                            "quantization_level": config["file_type"],
                            "context_length": info.context_length,
                            "embedding_length": info.embedding_length},
                "capabilities": ["embedding" if info.pooling_type else "completion"]}

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self.row(name, path)
                                             for name, path in self.store.manifests()]})

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = full_name(body.get("model") or body.get("name", ""))
        if "missing" in name:
            return await self._offline(request, name, body.get("stream", True))
        resp = web.StreamResponse()
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)

        async def say(**item) -> None:
            await resp.write(json.dumps(item).encode() + b"\n")

        await say(status="pulling manifest")
        seed = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_model(Path(tmp) / "m.gguf", name=name, seed=seed % 1000)
            data, params = path.read_bytes(), human(read_header(path).param_count)
        digest, size = self.store.put_blob(data)
        for done in (0, size // 2, size):
            await say(status=f"pulling {digest[7:19]}", digest=digest, total=size,
                      completed=done)
            await asyncio.sleep(0.01)
        config = {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                  "model_type": params, "file_type": "F32"}
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
            "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest,
                        "size": size}]}))
        await say(status="success")
        await resp.write_eof()
        return resp

    async def _offline(self, request: web.Request, name: str,
                       stream: bool) -> web.StreamResponse:
        """What Ollama answers a pull it cannot reach its registry for: streamed, a 200 whose
        last line is the error; whole, a 500."""
        registry, namespace, model, tag = split_name(name)
        error = {"error": f'pull model manifest: Get "https://{registry}/v2/{namespace}/'
                          f'{model}/manifests/{tag}": dial tcp: lookup {registry}: no such '
                          "host"}
        if not stream:
            return web.json_response(error, status=500)
        resp = web.StreamResponse()
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)
        await resp.write(b'{"status":"pulling manifest"}\n' + json.dumps(error).encode() + b"\n")
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
        return web.Response()


def make_app(root: Path) -> web.Application:
    o = Ollama(Store(root))
    app = web.Application()
    app.router.add_get("/api/tags", o.tags)
    app.router.add_get("/api/ps", o.ps)
    app.router.add_post("/api/pull", o.pull)
    app.router.add_delete("/api/delete", o.delete)
    app.router.add_get("/api/version", lambda r: web.json_response({"version": VERSION}))
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
