"""What the stack did, as it happens: loads, unloads with their reason, refusals. Kept for
the last few minutes' worth and sent live to the dashboard (GET /events, server-sent events;
`model top` reads the same feed's recent part)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque

from aiohttp import web

KEEP = 200
# a reader that falls this far behind (a stalled tab) is let go; it reconnects with
# Last-Event-ID and gets what it missed from the recent ones
BACKLOG = 500
# a comment line now and then, so that proxies and browsers do not take a quiet feed for dead
KEEPALIVE_SECONDS = 15.0
_END = None


class Events:
    def __init__(self) -> None:
        self.recent: deque[dict] = deque(maxlen=KEEP)
        self._readers: set[asyncio.Queue[dict | None]] = set()
        self._last = 0

    def emit(self, kind: str, model: str, backend: str, **fields: object) -> None:
        # ids from the clock (microseconds), so that they keep rising across proxy restarts:
        # a page that reconnects with the last id it had gets a restarted proxy's events
        self._last = max(self._last + 1, time.time_ns() // 1000)
        event = {"id": self._last, "at": round(time.time(), 3), "kind": kind, "model": model,
                 "backend": backend, **fields}
        self.recent.append(event)
        for queue in list(self._readers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._let_go(queue)

    def since(self, last_id: int) -> list[dict]:
        return [e for e in self.recent if e["id"] > last_id]

    def close(self) -> None:
        """Ends every feed: a stopping proxy does not wait DRAIN_SECONDS for open tabs."""
        for queue in list(self._readers):
            self._let_go(queue)

    def _let_go(self, queue: asyncio.Queue[dict | None]) -> None:
        self._readers.discard(queue)
        while not queue.empty():  # room for the end mark, which is always read last
            queue.get_nowait()
        queue.put_nowait(_END)

    @contextlib.contextmanager
    def reader(self):
        queue: asyncio.Queue[dict | None] = asyncio.Queue(BACKLOG)
        self._readers.add(queue)
        try:
            yield queue
        finally:
            self._readers.discard(queue)


def _frame(event: dict) -> bytes:
    return f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()


async def feed(request: web.Request, events: Events, last: int) -> web.StreamResponse:
    """The recent events after the id `last` (a reader that reconnects has the ones before),
    then each new one as it happens."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    with events.reader() as queue:  # before the backlog is sent: nothing falls in between
        await resp.prepare(request)
        for event in events.since(last):
            await resp.write(_frame(event))
            last = event["id"]
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            if event is _END:
                break
            if event["id"] > last:  # not already sent with the recent ones
                await resp.write(_frame(event))
                last = event["id"]
    await resp.write_eof()
    return resp
