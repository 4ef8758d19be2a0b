"""OpenAI chat and embeddings requests ↔ Ollama's native /api/chat and /api/embed, so that
samplers survive (Ollama's OpenAI layer drops min_p and others) and answers come back in
the shape OpenAI clients parse, reasoning and tool calls included."""

from __future__ import annotations

import json
import secrets

from services.proxy.apis.openai_shapes import Completion
from shared.catalog import Entry
from shared.ollama import context, keep_alive

# OpenAI-request field → Ollama option.
_OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict", "ctx_size": "num_ctx", "num_ctx": "num_ctx",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty", "typical_p": "typical_p",
}
# llama-server flag in a preset's sampler_args → Ollama option.
_PRESET_FLAGS = {
    "--temp": "temperature", "--temperature": "temperature", "--top-p": "top_p",
    "--top-k": "top_k", "--min-p": "min_p", "--seed": "seed",
    "--repeat-penalty": "repeat_penalty", "--presence-penalty": "presence_penalty",
    "--frequency-penalty": "frequency_penalty", "--typical": "typical_p",
}
# Samplers a client may send that Ollama has no option for: dropped, and said so.
UNSUPPORTED = ("top_n_sigma", "xtc_probability", "xtc_threshold", "dry_multiplier")


def preset_options(entry: Entry | None) -> dict:
    options = context(entry)
    words = entry.args if entry else []
    for flag, value in zip(words, words[1:], strict=False):
        if flag in _PRESET_FLAGS:
            try:
                options[_PRESET_FLAGS[flag]] = json.loads(value)
            except ValueError:
                options[_PRESET_FLAGS[flag]] = value
    return options


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _images(content) -> list[str]:
    out = []
    for part in content if isinstance(content, list) else []:
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
        if url.startswith("data:") and "," in url:
            out.append(url.split(",", 1)[1])
    return out


def _messages(messages: list[dict]) -> list[dict]:
    names_by_id: dict[str, str] = {}
    out = []
    for m in messages:
        msg = {"role": m.get("role", "user"), "content": _text(m.get("content"))}
        if images := _images(m.get("content")):
            msg["images"] = images
        if m.get("reasoning_content"):
            msg["thinking"] = m["reasoning_content"]
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function", {})
                names_by_id[call.get("id", "")] = fn.get("name", "")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = {}
                calls.append({"function": {"name": fn.get("name", ""), "arguments": args}})
            msg["tool_calls"] = calls
        if m.get("role") == "tool" and m.get("tool_call_id") in names_by_id:
            msg["tool_name"] = names_by_id[m["tool_call_id"]]
        out.append(msg)
    return out


def chat_request(payload: dict, ollama_name: str, entry: Entry | None) -> tuple[dict, list[str]]:
    """The /api/chat body, and a warning for each sampler that had to be dropped."""
    options = preset_options(entry)
    for field, option in _OPTIONS.items():
        if payload.get(field) is not None:
            options[option] = payload[field]
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    body: dict = {"model": ollama_name, "messages": _messages(payload.get("messages") or []),
                  "stream": bool(payload.get("stream")), "options": options}
    if (alive := keep_alive(entry)) is not None:
        body["keep_alive"] = alive
    if payload.get("tools"):
        body["tools"] = payload["tools"]
    fmt = (payload.get("response_format") or {}).get("type")
    if fmt == "json_object":
        body["format"] = "json"
    elif fmt == "json_schema":
        body["format"] = payload["response_format"].get("json_schema", {}).get("schema", "json")
    if payload.get("reasoning_effort"):
        body["think"] = payload["reasoning_effort"]
    warnings = [f"{f} is not supported by Ollama and was ignored"
                for f in UNSUPPORTED if payload.get(f) is not None]
    return body, warnings


def _tool_calls(message: dict, start: int = 0) -> list[dict]:
    calls = []
    for i, call in enumerate(message.get("tool_calls") or [], start):
        fn = call.get("function", {})
        args = fn.get("arguments", {})
        calls.append({"index": i, "id": call.get("id") or f"call_{secrets.token_hex(8)}",
                      "type": "function",
                      "function": {"name": fn.get("name", ""),
                                   "arguments": args if isinstance(args, str)
                                   else json.dumps(args)}})
    return calls


def _usage(done: dict) -> dict:
    prompt, completion = done.get("prompt_eval_count", 0), done.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish(done: dict, had_tools: bool) -> str:
    if had_tools:
        return "tool_calls"
    return "length" if done.get("done_reason") == "length" else "stop"


def chat_response(item: dict, model: str) -> dict:
    message = item.get("message") or {}
    out: dict = {"role": "assistant", "content": message.get("content", "")}
    if message.get("thinking"):
        out["reasoning_content"] = message["thinking"]
    calls = _tool_calls(message)
    if calls:
        out["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return Completion(model).whole(out, _finish(item, bool(calls)), _usage(item))


class ChatStream:
    """Ollama's NDJSON chat stream → OpenAI chunks: one id and `created`, the role once,
    tool calls numbered across the turn, finish and usage at the end."""

    def __init__(self, model: str) -> None:
        self.completion = Completion(model)
        self.role_sent = False
        self.tool_calls = 0

    def feed(self, item: dict) -> bytes:
        message = item.get("message") or {}
        delta: dict = {}
        if not self.role_sent:
            delta["role"] = "assistant"
            self.role_sent = True
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        if message.get("content"):
            delta["content"] = message["content"]
        calls = _tool_calls(message, self.tool_calls)
        if calls:
            delta["tool_calls"] = calls
            self.tool_calls += len(calls)
        out = self.completion.chunk(delta) if delta else b""
        if item.get("done"):
            out += self.completion.chunk({}, _finish(item, self.tool_calls > 0), usage=_usage(item))
            out += b"data: [DONE]\n\n"
        return out


def embed_request(payload: dict, ollama_name: str, entry: Entry | None) -> dict:
    body: dict = {"model": ollama_name, "input": payload.get("input", ""),
                  "options": context(entry)}
    if (alive := keep_alive(entry)) is not None:
        body["keep_alive"] = alive
    if payload.get("dimensions"):
        body["dimensions"] = payload["dimensions"]
    return body


def embed_response(item: dict, model: str) -> dict:
    tokens = item.get("prompt_eval_count", 0)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vec}
                     for i, vec in enumerate(item.get("embeddings") or [])],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
