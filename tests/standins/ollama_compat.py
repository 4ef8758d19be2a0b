"""The stand-in's answer, and Ollama's Anthropic (`/v1/messages`, since v0.14) and OpenAI
Responses (`/v1/responses`, since v0.13.3) compatibility routes, shaped as Ollama's own
converters shape them (ollama/anthropic/anthropic.go, ollama/openai/responses.go): a
non-streamed answer is one JSON object; a stream is `event: <type>` / `data: <json>` events,
Anthropic's message_start … message_stop, the Responses API's response.created …
response.completed, each Responses event with its `sequence_number`."""

from __future__ import annotations

import json
import re
import secrets
import time

from aiohttp import web


def reply(full: str, messages: list[dict], tools: list[dict]) -> tuple[str, str, list, dict]:
    """(text, thinking, tool calls, token counts) of the deterministic answer: a model whose
    name holds "think" thinks first; asked about the weather with tools, it calls them."""
    last = next((m for m in reversed(messages) if m["role"] == "user"), {})
    calls = []
    if tools and "weather" in str(last.get("content", "")):
        calls = [{"function": {"name": t["function"]["name"], "arguments": {"city": city}}}
                 for t, city in zip(tools * 2, ("Paris", "Rome"), strict=False)]
    text = "" if calls else f"Hello from {full}"
    thinking = "Let me think." if "think" in full else ""
    return text, thinking, calls, {"prompt_eval_count": 7,
                                   "eval_count": max(1, len(text.split()))}


def _pieces(text: str) -> list[str]:
    """The answer as streamed, a word at a time; together exactly the text."""
    return re.findall(r"\S+\s*", text)


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _begin(ollama, request: web.Request, path: str) -> tuple[dict, str] | web.Response:
    body = await request.json()
    ollama.requests.append({"path": path, **body})
    full = ollama._use(body.get("model", ""), None)
    if full is None:
        return web.json_response({"error": f"model '{body.get('model')}' not found"},
                                 status=404)
    return body, full


async def _stream(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
    await resp.write_eof()
    return resp


async def messages(ollama, request: web.Request) -> web.StreamResponse:
    begun = await _begin(ollama, request, "/v1/messages")
    if isinstance(begun, web.Response):
        return _anthropic_error(begun)
    body, full = begun
    turns = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
              else "".join(b.get("text", "") for b in m["content"])}
             for m in body.get("messages", [])]
    text, thinking, _, counts = reply(full, turns, [])
    usage = {"input_tokens": counts["prompt_eval_count"], "output_tokens": counts["eval_count"]}
    mid = "msg_" + secrets.token_hex(12)
    if not body.get("stream"):
        content = ([{"type": "thinking", "thinking": thinking}] if thinking else []) + \
            [{"type": "text", "text": text}]
        return web.json_response({"id": mid, "type": "message", "role": "assistant",
                                  "model": full, "content": content,
                                  "stop_reason": "end_turn", "usage": usage})
    events = [_event("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": body["model"],
        "content": [], "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}})]
    index = 0
    if thinking:
        events += [
            _event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "thinking",
                                                             "thinking": ""}}),
            _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "thinking_delta",
                                                     "thinking": thinking}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})]
        index = 1
    events.append(_event("content_block_start", {
        "type": "content_block_start", "index": index,
        "content_block": {"type": "text", "text": ""}}))
    events += [_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": piece}})
               for piece in _pieces(text)]
    events += [_event("content_block_stop", {"type": "content_block_stop", "index": index}),
               _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": "end_turn"}, "usage": usage}),
               _event("message_stop", {"type": "message_stop"})]
    return await _stream(request, events)


def _anthropic_error(response: web.Response) -> web.Response:
    message = json.loads(response.body)["error"]
    return web.json_response({"type": "error", "error": {"type": "not_found_error",
                                                         "message": message},
                              "request_id": "req_" + secrets.token_hex(12)},
                             status=response.status)


def _response(body: dict, rid: str, status: str, output: list, usage: dict | None) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()),
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status, "incomplete_details": None, "model": body["model"],
            "previous_response_id": None, "instructions": body.get("instructions"),
            "output": output, "error": None, "tools": [], "tool_choice": "auto",
            "truncation": "disabled", "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}}, "top_p": body.get("top_p", 1.0),
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": body.get("temperature", 1.0), "reasoning": None, "usage": usage,
            "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None,
            "store": False, "background": False, "service_tier": "default", "metadata": {},
            "safety_identifier": None, "prompt_cache_key": None}


async def responses(ollama, request: web.Request) -> web.StreamResponse:
    begun = await _begin(ollama, request, "/v1/responses")
    if isinstance(begun, web.Response):
        return begun
    body, full = begun
    given = body.get("input", "")
    turns = [{"role": "user", "content": given}] if isinstance(given, str) else given
    text, _, _, counts = reply(full, turns, [])
    n_in, n_out = counts["prompt_eval_count"], counts["eval_count"]
    usage = {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
             "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    rid, item_id = f"resp_{secrets.randbelow(999999)}", f"msg_{secrets.randbelow(999999)}"
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    message = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
               "content": [part]}
    if not body.get("stream"):
        return web.json_response(_response(body, rid, "completed", [message], usage))
    sequence = iter(range(1 << 30))

    def event(kind: str, **data) -> bytes:
        return _event(kind, {**data, "type": kind, "sequence_number": next(sequence)})

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events = [event("response.created", response=_response(body, rid, "in_progress", [], None)),
              event("response.in_progress",
                    response=_response(body, rid, "in_progress", [], None)),
              event("response.output_item.added", output_index=0,
                    item={**message, "status": "in_progress", "content": []}),
              event("response.content_part.added", **where, part={**part, "text": ""})]
    events += [event("response.output_text.delta", **where, delta=piece, logprobs=[])
               for piece in _pieces(text)]
    events += [event("response.output_text.done", **where, text=text, logprobs=[]),
               event("response.content_part.done", **where, part=part),
               event("response.output_item.done", output_index=0, item=message),
               event("response.completed",
                     response=_response(body, rid, "completed", [message], usage))]
    return await _stream(request, events)
