"""A client that stops reading its answer holds its model's slot: the proxy's writes wait on
a full socket, so it stops reading the model's server, whose slot waits on it in turn. Once
nothing of the answer has reached the client for the model's write timeout, the connection
is dropped, which ends the request (and the model's work on it) like a client leaving. What
the client has not taken is what the proxy and the kernel still hold for it: a client whose
receive buffer has room takes what comes (TCP tells no more), so a slow model's stalled
reader is found once that buffer is full.

The watch is a timer beside the request, not a deadline on each write: the hot path stays
as it is, and a model thinking before its first token is no stalled reader."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import sys
import termios
from collections.abc import Iterator

from aiohttp import web

log = logging.getLogger("model-serve.proxy")
_SO_NWRITE = 0x1024  # macOS: bytes in a socket's send buffer


def _unsent(sock: socket.socket | None) -> int:
    """Bytes the kernel still holds for the client: not yet taken into its receive buffer
    (Linux: SIOCOUTQ, which is TIOCOUTQ's number; macOS: SO_NWRITE); 0 where it cannot be
    asked, and then only what the proxy itself holds counts."""
    if sock is None:
        return 0
    try:
        if sys.platform == "darwin":
            return sock.getsockopt(socket.SOL_SOCKET, _SO_NWRITE)
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0


@contextlib.contextmanager
def watched(request: web.Request, model: str, seconds: float) -> Iterator[None]:
    transport, writer = request.transport, request.writer
    if transport is None:
        yield
        return
    sock = transport.get_extra_info("socket")
    loop = asyncio.get_running_loop()
    every = min(max(seconds / 4, 0.1), 2.0)
    taken, since = -1, loop.time()

    def check() -> None:
        nonlocal taken, since, handle
        held = transport.get_write_buffer_size() + _unsent(sock)
        now, reached = loop.time(), writer.output_size - held
        if held == 0 or reached != taken:
            taken, since = reached, now
        elif now - since >= seconds:
            log.warning("%s: the client at %s took nothing of its answer for %.0f s; its "
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
