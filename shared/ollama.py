"""Ollama's HTTP API, the parts model-serve uses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from shared.catalog import Entry


class OllamaUnavailable(RuntimeError):
    pass


class OllamaError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Ollama:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    def unavailable(self) -> OllamaUnavailable:
        return OllamaUnavailable(f"Ollama is not reachable at {self.base} (OLLAMA_BASE); "
                                 "start it with `ollama serve` or fix OLLAMA_BASE")

    async def call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            async with self.session.request(method, self.base + path, json=body) as r:
                text = await r.text()
                if r.status >= 400:
                    raise OllamaError(r.status, _message(text))
                return json.loads(text) if text.strip() else {}
        except aiohttp.ClientConnectionError:
            raise self.unavailable() from None

    async def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        """NDJSON lines as dicts; an error line raises OllamaError."""
        try:
            async with self.session.post(self.base + path, json=body) as r:
                if r.status >= 400:
                    raise OllamaError(r.status, _message(await r.text()))
                async for line in r.content:
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if "error" in item:
                        raise OllamaError(500, str(item["error"]))
                    yield item
        except aiohttp.ClientConnectionError:
            raise self.unavailable() from None
        except (aiohttp.ClientPayloadError, ValueError) as e:
            raise OllamaError(502, f"the answer broke off ({e})") from None

    async def tags(self) -> list[dict]:
        return (await self.call("GET", "/api/tags")).get("models") or []

    async def ps(self) -> list[dict]:
        return (await self.call("GET", "/api/ps")).get("models") or []

    async def load(self, name: str, entry: Entry | None) -> None:
        """An /api/embed without input: Ollama answers it by loading the model, chat and
        embedding models alike (an empty /api/generate is refused for an embedding model),
        at the context the model's requests will ask for."""
        body: dict = {"model": name, "options": context(entry)}
        if (alive := keep_alive(entry)) is not None:
            body["keep_alive"] = alive
        await self.call("POST", "/api/embed", body)

    async def unload(self, name: str) -> None:
        await self.call("POST", "/api/generate", {"model": name, "keep_alive": 0})


def keep_alive(entry: Entry | None) -> str | int | None:
    """The model's TTL as Ollama's keep_alive; Ollama's own default for its own models."""
    if entry is None:
        return None
    return f"{entry.ttl}s" if entry.ttl else -1


def context(entry: Entry | None) -> dict:
    """The options that fix a model's context, which its load and every request for it
    carry: a request at another context makes Ollama start a second runner for it, outside
    admission. Ollama's own models run at Ollama's default."""
    return {"num_ctx": entry.ctx_size} if entry else {}


def _message(text: str) -> str:
    try:
        data = json.loads(text)
        return str(data.get("error") or text)
    except (ValueError, AttributeError):
        return text.strip() or "no reason given"
