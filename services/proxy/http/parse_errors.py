"""Requests aiohttp cannot parse (a header line past its limit, a malformed request) are
answered before any route or middleware sees them, in plain text, with a traceback in the log
for each. Here they get a JSON error and one log line. The route is not known then (the
headers never finished), so the body is one that OpenAI's and Anthropic's SDKs both read:
`error.message`, `error.type`, and Anthropic's `"type": "error"`."""

from __future__ import annotations

import json
import logging

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

log = logging.getLogger("model-serve.proxy")
# a header line (a long cookie, a token) may be this long: aiohttp's own limit is 8 KiB, and
# browsers send localhost's cookies of every local app to every port
MAX_LINE = 64 * 1024
MAX_HEADERS = 128  # aiohttp's own limit
_TOO_MANY = "Too many headers received"  # aiohttp's words, its one sign of that limit


def _handle_error(self: web_protocol.RequestHandler, request: web.BaseRequest,
                  status: int = 500, exc: BaseException | None = None,
                  message: str | None = None) -> web.StreamResponse:
    if not isinstance(exc, HttpProcessingError):  # a failing handler: aiohttp's own answer
        return _aiohttp_handle_error(self, request, status, exc, message)
    code, reason = "bad_request", exc.message.splitlines()[0][:120] if exc.message else ""
    if isinstance(exc, LineTooLong) or reason == _TOO_MANY:
        status, code = 431, "request_header_too_large"
        reason = (f"a request line or header over {MAX_LINE} bytes" if reason != _TOO_MANY
                  else f"more than {MAX_HEADERS} headers")
        text = f"{reason}; send large values in the body"
    else:
        text = f"malformed HTTP request: {reason}"
    # the reason only: aiohttp's message quotes the request's bytes (a cookie, a key)
    log.warning("refused a request from %s (%d): %s", request.remote, status,
                reason if status == 431 else type(exc).__name__)
    if request.writer.output_size > 0:  # nothing more can be said on this connection
        raise ConnectionError("the answer had begun")
    body = {"type": "error", "error": {"message": text, "type": "invalid_request_error",
                                       "code": code}}
    response = web.Response(status=status, text=json.dumps(body),
                            content_type="application/json")
    response.force_close()
    return response


_aiohttp_handle_error = web_protocol.RequestHandler.handle_error


def install() -> None:
    """aiohttp has no hook for these answers: its handler's method is replaced, in the proxy's
    process only."""
    web_protocol.RequestHandler.handle_error = _handle_error  # type: ignore[method-assign]
