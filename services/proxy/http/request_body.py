"""A request's JSON body, read with a time limit and checked before it costs anything."""

from __future__ import annotations

import asyncio
import json
from email.message import Message
from email.parser import BytesHeaderParser

from aiohttp import web

from services.proxy.context import CTX
from shared.errors import error_response

# Fields that are true or false and nothing else: "no" must not count as true.
BOOLEANS = ("stream", "force")


def parse(body: bytes) -> tuple[dict | None, web.Response | None]:
    try:
        payload = json.loads(body)
    except RecursionError:
        return None, error_response(400, "request body is nested too deeply", "invalid_json")
    except ValueError as e:
        return None, error_response(400, f"request body is not valid JSON: {e}", "invalid_json")
    if not isinstance(payload, dict):
        return None, error_response(400, "request body must be a JSON object", "invalid_json")
    for field in BOOLEANS:  # null means not given, as OpenAI takes it
        if payload.get(field) is not None and not isinstance(payload[field], bool):
            return None, error_response(400, f"{field!r} must be true or false, got "
                                        f"{payload[field]!r}", "invalid_type")
    return payload, None


def _too_many(request: web.Request, payload: dict) -> web.Response | None:
    limit = request.app[CTX].settings.max_messages
    for field in ("messages", "input"):
        items = payload.get(field)
        if isinstance(items, list) and len(items) > limit:
            return error_response(400, f"{field!r} has {len(items)} items; the limit is {limit} "
                                  "(MAX_MESSAGES)", "too_many_messages")
    return None


async def read_raw(request: web.Request) -> tuple[bytes, web.Response | None]:
    """The body as it came (at most MAX_BODY_BYTES, within REQUEST_READ_TIMEOUT), or an
    error response for the client."""
    settings = request.app[CTX].settings
    timeout = settings.request_read_timeout
    if (request.content_length or 0) > settings.max_body_bytes:  # said up front: no wait
        raise web.HTTPRequestEntityTooLarge(max_size=settings.max_body_bytes,
                                            actual_size=request.content_length)
    try:
        async with asyncio.timeout(timeout):
            return await request.read(), None
    except TimeoutError:
        return b"", error_response(
            408, f"the request body did not arrive within {timeout:g}s (REQUEST_READ_TIMEOUT)",
            "request_timeout")


async def read(request: web.Request) -> tuple[bytes, dict | None, web.Response | None]:
    """(raw body, JSON object, None), or an error response for the client."""
    body, problem = await read_raw(request)
    if problem:
        return body, None, problem
    payload, problem = parse(body)
    if payload is not None:
        problem = _too_many(request, payload)
    return body, payload if problem is None else None, problem


def _param(header: str, value: str, name: str) -> str | None:
    message = Message()
    message[header] = value
    param = message.get_param(name, header=header)
    return param if isinstance(param, str) else None


def _field_span(body: bytes, content_type: str, name: str) -> tuple[int, int] | None:
    """Where the value of field `name` of a multipart/form-data body lies, or None. Only the
    parts' headers are read: an uploaded file of any size stays where it is."""
    boundary = _param("content-type", content_type, "boundary")
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode()
    at = body.find(delimiter)
    while at != -1 and not body.startswith(b"--", at + len(delimiter)):
        start = at + len(delimiter)
        head_end = body.find(b"\r\n\r\n", start)
        end = body.find(b"\r\n" + delimiter, head_end)
        if head_end == -1 or end == -1:
            return None
        headers = BytesHeaderParser().parsebytes(body[start:head_end].lstrip())
        disposition = headers.get("content-disposition", "")
        if _param("content-disposition", disposition, "name") == name:
            return head_end + 4, end
        at = end + 2
    return None


def form_field(body: bytes, content_type: str, name: str) -> str | None:
    """The text of field `name` of a multipart/form-data body, or None."""
    span = _field_span(body, content_type, name)
    return body[span[0]:span[1]].decode(errors="replace") if span else None


def with_form_field(body: bytes, content_type: str, name: str, value: str) -> bytes | None:
    """The multipart/form-data body with field `name`'s text replaced by `value` (the rest,
    boundary and files, as they came), or None when it has no such field."""
    span = _field_span(body, content_type, name)
    return body[:span[0]] + value.encode() + body[span[1]:] if span else None
