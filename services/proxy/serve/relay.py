"""An answer relayed chunk by chunk from a backend, its `model` renamed to the name the
client asked for, and a stream cut short said so, in the route's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp
from aiohttp import web

from services.proxy.apis import anthropic_errors
from services.proxy.manage import metrics
from services.proxy.serve import upstream
from services.proxy.serve.routes import ANTHROPIC, OLLAMA, Route
from shared.errors import stream_error

log = logging.getLogger("model-serve.proxy")


class ModelRenamer:
    """Rewrites `"model":"<engine name>"` (and `"model": "<engine name>"`, as Python's json
    writes it) to the name the client asked for, across chunk boundaries, holding back only
    bytes that could start the pattern."""

    def __init__(self, old: str, new: str) -> None:
        old_b, new_b = json.dumps(old).encode(), json.dumps(new).encode()
        self.pattern, self.spaced = b'"model":' + old_b, b'"model": ' + old_b
        self.replacement, self.spaced_replacement = b'"model":' + new_b, b'"model": ' + new_b
        self.tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self.tail + chunk).replace(self.pattern, self.replacement)
        data = data.replace(self.spaced, self.spaced_replacement)
        self.tail = b""
        if data.endswith(b"\n"):  # the usual end of an SSE event: nothing to hold back
            return data
        # the longest end that could start either pattern is held back: it starts with '"'
        start = data.find(b'"', max(0, len(data) - len(self.spaced) + 1))
        while start >= 0:
            if self.spaced.startswith(data[start:]) or self.pattern.startswith(data[start:]):
                self.tail = data[start:]
                return data[:start]
            start = data.find(b'"', start + 1)
        return data

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail


async def whole(up: aiohttp.ClientResponse, renamer: ModelRenamer | None) -> web.Response:
    """An answer that is not a stream: one JSON object (or text), read whole."""
    data = await up.read()
    metrics.answer_end(data)
    if renamer:
        data = renamer.feed(data) + renamer.flush()
    return web.Response(body=data, status=up.status, content_type=up.content_type,
                        charset=up.charset)


def _cut_event(route: Route, message: str, last: bytes = b"\n") -> bytes:
    """The route's last event of a stream that cannot finish; Ollama's is an NDJSON line
    (on a line of its own) `{"error": "..."}`, as Ollama ends its own."""
    if route.errors == OLLAMA:
        line = json.dumps({"error": message}).encode() + b"\n"
        return line if not last or last.endswith(b"\n") else b"\n" + line
    if route.errors == ANTHROPIC:
        return anthropic_errors.stream_error(message)
    return stream_error(message)


class MessageStart:
    """llama-server leaves out Anthropic's `message_start` when the first token it generates
    is not sent on its own (part of a character, or held back as a possible stop string),
    and the `anthropic` SDK cannot read a stream without it: one is put in front of a
    stream that does not begin with it."""

    START = b"event: message_start"

    def __init__(self, model: str) -> None:
        self.model = model
        self.head: bytes | None = b""  # None once the stream's beginning is known

    def feed(self, chunk: bytes) -> bytes:
        if self.head is None:
            return chunk
        head = self.head + chunk
        if len(head) < len(self.START) and self.START.startswith(head):
            self.head = head
            return b""
        self.head = None
        return head if head.startswith(self.START) else self._event() + head

    def flush(self) -> bytes:
        head, self.head = self.head or b"", None
        return head

    def _event(self) -> bytes:
        message = {"id": f"msg_{secrets.token_hex(12)}", "type": "message",
                   "role": "assistant", "content": [], "model": self.model,
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        data = json.dumps({"type": "message_start", "message": message})
        return self.START + b"\ndata: " + data.encode() + b"\n\n"


class ResponsesIndexes:
    """llama-server's Responses stream events lack the `sequence_number`, `output_index` and
    `content_index` the API defines, and the openai SDK's `responses.stream()` indexes by
    them: each event gets them, counted as the API counts (every event; each output item in
    order of appearance; its one content part). The opening events' response gets the
    `output: []` llama-server leaves out."""

    OPENING = ("response.created", "response.in_progress")

    def __init__(self) -> None:
        self.pending = b""
        self.sequence = 0
        self.items: dict[str, int] = {}

    def feed(self, chunk: bytes) -> bytes:
        whole, end, self.pending = (self.pending + chunk).rpartition(b"\n\n")
        if not end:  # no whole event yet: all of it is pending
            return b""
        return b"".join(self._event(event) + b"\n\n" for event in whole.split(b"\n\n"))

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for n, line in enumerate(lines):
            if line.startswith(b"data: {"):
                try:
                    data = json.loads(line[6:])
                except ValueError:
                    return event
                self._fill(data)
                lines[n] = b"data: " + json.dumps(data).encode()
        return b"\n".join(lines)

    def _fill(self, data: dict) -> None:
        data.setdefault("sequence_number", self.sequence)
        if data.get("type") in self.OPENING and isinstance(data.get("response"), dict):
            # llama-server's response so far has no `output`, which the Node openai SDK's
            # `responses.stream()` iterates
            data["response"].setdefault("output", [])
        self.sequence += 1
        item = data.get("item")
        item_id = data.get("item_id") or (item.get("id") if isinstance(item, dict) else None)
        if not isinstance(item_id, str):
            return
        data.setdefault("output_index", self.items.setdefault(item_id, len(self.items)))
        if "item_id" in data and "function_call" not in data.get("type", ""):
            data.setdefault("content_index", 0)


class Rewriter(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def _through(rewriters: Sequence[Rewriter], chunk: bytes, flush: bool = False) -> bytes:
    for rewriter in rewriters:
        chunk = rewriter.feed(chunk) + (rewriter.flush() if flush else b"")
    return chunk


async def relay(request: web.Request, up: aiohttp.ClientResponse,
                rewriters: Sequence[Rewriter], route: Route, source: str,
                hint: str | Callable[[], str]) -> web.StreamResponse:
    """Chunk by chunk as `source` (the engine, Ollama) sends them, through `rewriters` in
    turn. A stream that stops before the route's last event (the model's process died, the
    backend went away) ends with an error event, so the client's SDK raises instead of
    taking a cut answer for a whole one; `hint` says where to look (or why, when it ended
    it: then it is asked at the end)."""
    resp = web.StreamResponse(status=up.status)
    resp.content_type = up.content_type
    if up.charset:
        resp.charset = up.charset
    await resp.prepare(request)
    ends = route.stream_end if isinstance(route.stream_end, tuple) else (route.stream_end,)
    longest = max(len(end) for end in ends)
    done, tail, detail = False, b"", ""
    # for the metrics: the first chunk's time, and the answer's last bytes, where the usage
    # and timings of its last events are (no event is parsed on the way); however the
    # backend's writes were cut into chunks
    first, last = None, b""
    turn = metrics.turn()

    def counted() -> None:
        if turn and first is not None:
            turn.first_byte, turn.complete = first, done
            turn.ending(last)

    try:
        async for chunk in up.content.iter_any():
            if first is None:
                first = time.monotonic()
            last = (last + chunk)[-metrics.END_BYTES:]
            if not done:
                seen = tail + chunk
                done = any(end in seen for end in ends)
                tail = seen[-longest:]
            await resp.write(_through(rewriters, chunk))
        cut = None if done else f"{source} ended the stream before it was complete"
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        # a client that left before the end: its write failed, not the model's read
        if not done and upstream.the_client_left(request):
            raise asyncio.CancelledError from None
        # aiohttp's wording ("400, message='Not enough data…'") is for the log, not the client
        cut, detail = None if done else f"the connection to {source} broke mid-answer", str(e)
    except asyncio.CancelledError:
        # the proxy is stopping and its drain time is over, or the client left (perhaps on
        # the last event, while the model's server had yet to end the stream): a client
        # still there hears it, so its SDK raises
        counted()
        if not done:
            with contextlib.suppress(Exception):
                await resp.write(_cut_event(route, "model-serve's proxy stopped before the "
                                            "answer was complete; ask again", last))
                await resp.write_eof()
        raise
    counted()
    await resp.write(_through(rewriters, b"", flush=True))
    if cut:
        hint = hint() if callable(hint) else hint
        log.warning("%s: %s%s; %s", request.path, cut, f" ({detail})" if detail else "", hint)
        await resp.write(_cut_event(route, f"{cut}; {hint}", last))
    await resp.write_eof()
    return resp
