"""Ollama's native /api/chat, /api/generate and /api/embed ↔ the engine's OpenAI routes:
the request one way, the answer (whole or streamed as NDJSON) the other."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from shared.catalog import Entry

# Ollama option → llama-server field; llama-server's OpenAI routes take its own samplers too.
_OPTIONS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
    "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep", "num_predict": "max_tokens",
}
# The first bytes of an image's base64 → its type, for the data: URL OpenAI content wants.
_IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lGOD": "image/gif",
                "UklGR": "image/webp"}


class BadRequest(ValueError):
    """A request the engine cannot be asked: the client gets a 400 with this message."""


def now() -> str:
    return datetime.now(UTC).isoformat()


def keep_alive_zero(value: object) -> bool:
    """keep_alive 0 (a number or a duration such as "0s"): unload once answered."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        digits = value.strip().rstrip("hms")
        try:
            return float(digits) == 0
        except ValueError:
            return False
    return False


def samplers(payload: dict, entry: Entry) -> dict:
    """Ollama's `options` as llama-server fields. num_ctx cannot change a running model's
    context: a larger one than the model's is refused, a smaller one needs nothing."""
    options = payload.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    num_ctx = options.get("num_ctx")
    if isinstance(num_ctx, int) and num_ctx > entry.ctx_size:
        raise BadRequest(f"num_ctx {num_ctx} is larger than {entry.id}'s context of "
                         f"{entry.ctx_size}; set ctx_size for it in custom_models.yaml")
    out = {field: options[name] for name, field in _OPTIONS.items()
           if options.get(name) is not None}
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] < 0:
        del out["max_tokens"]  # -1 (no limit) and -2 (fill the context): the engine's own
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


def response_format(fmt: object) -> dict | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise BadRequest(f'format must be "json" or a JSON schema, got {fmt!r:.60}')


def _thinking(think: object) -> dict:
    """Ollama's `think` as what llama-server's chat templates read."""
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if isinstance(think, str) and think:  # GPT-OSS's levels: low, medium, high
        return {"reasoning_effort": think, "chat_template_kwargs": {"reasoning_effort": think}}
    return {}


def _image_url(data: str) -> dict:
    kind = next((t for prefix, t in _IMAGE_TYPES.items() if data.startswith(prefix)),
                "image/jpeg")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}


def _content(text: str, images: object) -> str | list[dict]:
    if not images:
        return text
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("images must be a list of base64 strings")
    return [{"type": "text", "text": text}, *(_image_url(i) for i in images)]


def _arguments(args: object) -> str:
    return args if isinstance(args, str) else json.dumps(args)


def chat_messages(messages: object) -> list[dict]:
    """Ollama messages as OpenAI's. Ollama's tool calls carry no ids: each gets one, and a
    tool result answers the call of its `tool_name`, else the oldest one unanswered."""
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out: list[dict] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a role")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest("message content must be a string")
        msg: dict = {"role": m["role"], "content": _content(content, m.get("images"))}
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        calls = []
        for call in m.get("tool_calls") or []:
            if not isinstance(call, dict):
                raise BadRequest("each tool call must be an object")
            fn = call.get("function") or {}
            cid = call.get("id") or f"call_{len(out)}_{len(calls)}"
            calls.append({"id": cid, "type": "function",
                          "function": {"name": fn.get("name", ""),
                                       "arguments": _arguments(fn.get("arguments", {}))}})
            unanswered.append((cid, fn.get("name", "")))
        if calls:
            msg["tool_calls"] = calls
        if m["role"] == "tool":
            name = m.get("tool_name") or m.get("name")
            answered = next((u for u in unanswered if u[1] == name),
                            unanswered[0] if unanswered else None)
            if answered:
                unanswered.remove(answered)
            msg["tool_call_id"] = m.get("tool_call_id") or (answered[0] if answered else "")
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def chat_body(payload: dict, entry: Entry, stream: bool) -> dict:
    body: dict = {"model": entry.id, "messages": chat_messages(payload.get("messages")),
                  "stream": stream, **samplers(payload, entry), **_thinking(payload.get("think"))}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if payload.get("tools"):
        body["tools"] = payload["tools"]
    if fmt := response_format(payload.get("format")):
        body["response_format"] = fmt
    return body


def generate_body(payload: dict, entry: Entry, stream: bool) -> tuple[str, dict]:
    """(engine path, body): a raw prompt goes to /v1/completions as it is; any other through
    the model's chat template, as Ollama applies its template."""
    prompt = payload.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if payload.get("suffix"):
        raise BadRequest(f"suffix (fill in the middle) is not supported for {entry.id}, "
                         "which the engine serves")
    if payload.get("raw"):
        body: dict = {"model": entry.id, "prompt": prompt, "stream": stream,
                      **samplers(payload, entry)}
        if fmt := response_format(payload.get("format")):
            body["response_format"] = fmt
        return "/v1/completions", body
    messages = [{"role": "system", "content": payload["system"]}] if payload.get("system") \
        else []
    messages.append({"role": "user", "content": prompt, "images": payload.get("images")})
    return "/v1/chat/completions", chat_body({**payload, "messages": messages}, entry, stream)


def _object(arguments: str) -> object:
    """OpenAI's arguments (a JSON string) as the object Ollama's clients expect."""
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


def tool_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": (c.get("function") or {}).get("name", ""),
                          "arguments": _object((c.get("function") or {}).get("arguments"))}}
            for c in calls]


def done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


class Stats:
    """Ollama's counts and durations (nanoseconds) from the engine's usage and timings."""

    def __init__(self, load_seconds: float) -> None:
        self.started = time.monotonic() - load_seconds
        self.load_ns = int(load_seconds * 1e9)
        self.usage: dict = {}
        self.timings: dict = {}

    def take(self, answer: dict) -> None:
        self.usage = answer.get("usage") or self.usage
        self.timings = answer.get("timings") or self.timings

    def fields(self) -> dict:
        t, u = self.timings, self.usage
        return {"total_duration": int((time.monotonic() - self.started) * 1e9),
                "load_duration": self.load_ns,
                "prompt_eval_count": u.get("prompt_tokens", t.get("prompt_n", 0)),
                "prompt_eval_duration": int(t.get("prompt_ms", 0) * 1e6),
                "eval_count": u.get("completion_tokens", t.get("predicted_n", 0)),
                "eval_duration": int(t.get("predicted_ms", 0) * 1e6)}


class Answer:
    """The engine's OpenAI answer → Ollama's: `message` for chat, `response` for generate;
    thinking only when the client did not turn it off."""

    def __init__(self, model: str, chat: bool, think: object, stats: Stats) -> None:
        self.model, self.chat, self.stats = model, chat, stats
        self.keep_thinking = think is not False

    def item(self, content: str, thinking: str = "", calls: list | None = None,
              **extra) -> dict:
        item: dict = {"model": self.model, "created_at": now()}
        if self.chat:
            message: dict = {"role": "assistant", "content": content}
            if thinking and self.keep_thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            item["message"] = message
        else:
            item["response"] = content
            if thinking and self.keep_thinking:
                item["thinking"] = thinking
        return {**item, **extra}

    def whole(self, answer: dict) -> dict:
        self.stats.take(answer)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content = message.get("content") or choice.get("text") or ""
        return self.item(content, message.get("reasoning_content") or "",
                          tool_calls(message.get("tool_calls") or []), done=True,
                          done_reason=done_reason(choice.get("finish_reason")),
                          **self.stats.fields())

    def loaded(self, reason: str) -> dict:
        """The answer to a request without a prompt: a load, or (keep_alive 0) an unload."""
        return self.item("", done=True, done_reason=reason)


class Stream:
    """OpenAI chunks → Ollama NDJSON lines as they come; tool calls, which arrive in pieces,
    are sent whole in one line before the last, as Ollama sends them."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.calls: dict[int, dict] = {}
        self.finish: str | None = None

    def feed(self, chunk: dict) -> bytes:
        self.answer.stats.take(chunk)
        out = b""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for part in delta.get("tool_calls") or []:
                call = self.calls.setdefault(part.get("index", len(self.calls)),
                                             {"function": {"name": "", "arguments": ""}})
                fn = part.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            content = delta.get("content") or choice.get("text") or ""
            thinking = delta.get("reasoning_content") or ""
            if content or (thinking and self.answer.keep_thinking):
                out += line(self.answer.item(content, thinking, done=False))
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def end(self) -> bytes:
        out = b""
        if self.calls:
            calls = tool_calls([self.calls[i] for i in sorted(self.calls)])
            out += line(self.answer.item("", calls=calls, done=False))
        return out + line(self.answer.item("", done=True, done_reason=done_reason(
            self.finish), **self.answer.stats.fields()))


def line(item: dict) -> bytes:
    return json.dumps(item).encode() + b"\n"


def embed_answer(answer: dict, model: str, stats: Stats) -> dict:
    stats.take(answer)
    vectors = [d.get("embedding") for d in sorted(answer.get("data") or [],
                                                   key=lambda d: d.get("index", 0))]
    return {"model": model, "embeddings": vectors, **{
        k: v for k, v in stats.fields().items()
        if k in ("total_duration", "load_duration", "prompt_eval_count")}}
