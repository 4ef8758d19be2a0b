"""The OpenAI chat completion shapes the proxy builds itself (Ollama and Harmony answers):
one id and `created` for a whole answer, streamed or not."""

from __future__ import annotations

import json
import secrets
import time


class Completion:
    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> bytes:
        """One server-sent event with a `chat.completion.chunk`."""
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def whole(self, message: dict, finish: str, usage: dict) -> dict:
        """A non-streamed `chat.completion`."""
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage}
