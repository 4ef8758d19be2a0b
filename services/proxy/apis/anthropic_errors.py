"""Errors in Anthropic's shape on the Anthropic routes, so that the `anthropic` SDK raises the
exception class that goes with the status and reads the message:
`{"type": "error", "error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

import json

# Anthropic's error types by status (its API reference); other 5xx are api_error
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict:
    kind = TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def stream_error(message: str) -> bytes:
    """The event the SDK raises on: a stream's `event: error`. The leading blank line ends
    whatever event the stream was in."""
    return (b"\n\nevent: error\ndata: " + json.dumps(error_body(502, message)).encode()
            + b"\n\n")
