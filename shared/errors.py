"""OpenAI-shaped error bodies: {"error": {"message", "type", "code", ...}}."""

from __future__ import annotations

import json

from aiohttp import web

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "code": code, **extra}}


def error_response(status: int, message: str, code: str | None = None,
                   **extra) -> web.Response:
    return web.json_response(error_body(status, message, code, **extra), status=status)


def stream_error(message: str, code: str = "stream_interrupted") -> bytes:
    """The last event of a stream that cannot finish: the official SDKs raise on an event
    whose data holds `error`. The leading blank line ends whatever the stream was in."""
    return b"\n\ndata: " + json.dumps(error_body(502, message, code)).encode() + b"\n\n"
