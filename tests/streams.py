"""Client helpers for tests: streaming reads as a client sees them."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator


def stream_chat(url: str, model: str, max_tokens: int = 16, **extra) -> list[dict]:
    """Send a streaming chat request; return the parsed SSE events (without [DONE])."""
    return list(stream_events(url, model, max_tokens, **extra))


def stream_events(url: str, model: str, max_tokens: int = 16, **extra) -> Iterator[dict]:
    """stream_chat's events as they arrive."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": True, **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    done = False
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            yield json.loads(line[6:])
    assert done, "stream ended without [DONE]"


def chat(model: str, max_tokens: int = 4, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, **extra}
