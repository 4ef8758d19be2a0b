"""OpenAI-shaped error bodies: {"error": {"message", "type", "code", ...}}."""

from __future__ import annotations

from aiohttp import web

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
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
