"""A client that stops reading its answer holds its model's slot: the proxy's writes wait on
a full socket, so it stops reading the model's server, whose slot waits on it in turn. Once
nothing of the answer has reached the client for the model's write timeout, the connection
is dropped, which ends the request (and the model's work on it) like a client leaving.

The watch is a timer beside the request, not a deadline on each write: the hot path stays
as it is, and a model thinking before its first token is no stalled reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiohttp import web

log = logging.getLogger("model-serve.proxy")


@contextlib.contextmanager
def watched(request: web.Request, model: str, seconds: float) -> Iterator[None]:
    transport, writer = request.transport, request.writer
    if transport is None:
        yield
        return
    loop = asyncio.get_running_loop()
    every = min(max(seconds / 4, 0.1), 2.0)
    sent, since = -1, loop.time()

    def check() -> None:
        nonlocal sent, since, handle
        pending = transport.get_write_buffer_size()
        now, reached = loop.time(), writer.output_size - pending
        if pending == 0 or reached != sent:
            sent, since = reached, now
        elif now - since >= seconds:
            log.warning("%s: the client at %s read nothing of its answer for %.0f s; its "
                        "connection is closed and the model's slot freed (write_timeout)",
                        model, request.remote, now - since)
            transport.abort()
            return
        handle = loop.call_later(every, check)

    handle = loop.call_later(every, check)
    try:
        yield
    finally:
        handle.cancel()
