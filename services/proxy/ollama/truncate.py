"""Ollama's `truncate` for the engine's models: a prompt longer than the model's context is cut
to fit, as Ollama cuts it, instead of llama-server's 400. Nothing happens on the way there:
only when llama-server refuses a request for its length is the prompt measured (the model's
own /apply-template and /tokenize) and cut, and the request sent once more.

What Ollama does (server/prompt.go `chatPrompt`, its runner's `truncating input prompt`):
a chat keeps its system messages and its latest message (with the assistant tool-call turn a
tool answer belongs to), and as many of the newest other messages as fit; a single message that
does not fit alone loses its start. /api/embed keeps each input's start. `truncate: false`
gives llama-server's refusal itself, as Ollama passes it on."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from services.proxy.context import Context
from services.proxy.serve import upstream
from shared.catalog import Entry

log = logging.getLogger("model-serve.proxy")
# tokens kept spare when a text is cut: a cut text's tokens may differ by a few once joined
MARGIN = 4
# Ollama's refusal of an embedding input longer than the model's context
TOO_LONG = "the input length exceeds the context length"
_BATCH = re.compile(r"too large to process.*current batch size: (\d+)", re.S)


class Unfit(Exception):
    """The prompt cannot be made to fit (or measured): the client gets the refusal."""


@dataclass
class Overflow:
    """llama-server's refusal of a prompt for its length: its text, and the tokens it holds."""
    text: str
    limit: int


def overflow(status: int, text: str) -> Overflow | None:
    """The refusal, if `text` (an error answer's body) is one for a prompt's length: a chat or
    completion's `exceed_context_size_error` (n_ctx), an embedding's "too large to process"
    (the batch size, which bounds one input)."""
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(err, dict):
        return None
    if status == 400 and err.get("type") == "exceed_context_size_error" \
            and isinstance(err.get("n_ctx"), int):
        return Overflow(text.strip(), err["n_ctx"])
    if m := _BATCH.search(str(err.get("message", ""))):
        return Overflow(text.strip(), int(m.group(1)))
    return None


def allowed(payload: dict) -> bool:
    """Ollama's default is to truncate; `truncate: false` turns it off."""
    return payload.get("truncate") is not False


class Model:
    """The model's own llama-server routes that measure a prompt."""

    def __init__(self, ctx: Context, entry: Entry) -> None:
        self.ctx, self.entry = ctx, entry

    async def _call(self, path: str, body: dict) -> dict:
        ctx, entry = self.ctx, self.entry
        try:
            async with await upstream.post(ctx, entry, path, ctx.engine.route_url(entry, path),
                                           json={"model": entry.id, **body},
                                           headers=ctx.engine.headers) as up:
                text = await up.text(errors="replace")
                if up.status >= 400:
                    raise Unfit(f"{path}: {up.status} {text[:200]}")
                return json.loads(text)
        except (aiohttp.ClientError, ValueError) as e:
            raise Unfit(f"{path}: {e}") from None

    async def tokens(self, text: str, special: bool = False) -> list[int]:
        answer = await self._call("/tokenize", {"content": text, "add_special": special})
        return [t if isinstance(t, int) else t["id"] for t in answer.get("tokens", [])]

    async def prompt_tokens(self, body: dict) -> int:
        """The tokens of a chat body's prompt, as its template renders it."""
        fields = {k: body[k] for k in ("messages", "tools", "chat_template_kwargs",
                                       "reasoning_effort") if k in body}
        prompt = (await self._call("/apply-template", fields)).get("prompt", "")
        return len(await self.tokens(prompt, special=True))


def room(body: dict, n_ctx: int) -> int:
    """The prompt's share of the context: the rest is left for the answer, its max_tokens
    when the request gives one, else a quarter of the context (at most half, either way)."""
    asked = body.get("max_tokens")
    answer = asked if isinstance(asked, int) and asked > 0 else n_ctx // 4
    return n_ctx - min(answer, n_ctx // 2)


def block_start(messages: list[dict], i: int) -> int:
    """Where message i's turn starts: a tool answer is never kept without the assistant
    message whose call it answers (Ollama's toolBlockStartIndex)."""
    if i <= 0 or i >= len(messages) or messages[i].get("role") != "tool":
        return i
    start = i
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    if start > 0 and messages[start - 1].get("role") == "assistant" \
            and messages[start - 1].get("tool_calls"):
        return start - 1
    return i


def _kept(messages: list[dict], start: int) -> list[dict]:
    return [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return next((p.get("text", "") for p in content or [] if p.get("type") == "text"), "")


def _with_text(message: dict, text: str) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        parts, done = [], False
        for p in content:
            if p.get("type") == "text" and not done:
                p, done = {**p, "text": text}, True
            parts.append(p)
        return {**message, "content": parts}
    return {**message, "content": text}


async def fit_chat(model: Model, body: dict, n_ctx: int) -> tuple[dict, str]:
    """The chat body cut to fit, and what was cut. The oldest messages other than system
    messages go first (the smallest number that makes it fit, found by halving rather than
    one by one); the latest message loses its start only when it alone does not fit."""
    limit = room(body, n_ctx)
    messages = body["messages"]
    starts = sorted({block_start(messages, i) for i in range(len(messages))})
    last = starts[-1]
    dropped = len(messages) - len(_kept(messages, last))
    if await model.prompt_tokens({**body, "messages": _kept(messages, last)}) <= limit:
        best, lo, hi = last, 1, len(starts) - 2  # starts[0] (all of them) was refused
        while lo <= hi:
            mid = (lo + hi) // 2
            kept = _kept(messages, starts[mid])
            if await model.prompt_tokens({**body, "messages": kept}) <= limit:
                best, hi = starts[mid], mid - 1
            else:
                lo = mid + 1
        kept = _kept(messages, best)
        dropped = len(messages) - len(kept)
        return {**body, "messages": kept}, \
            f"dropped the {dropped} oldest of {len(messages)} messages to fit"
    # the latest turn alone is too long: its last message loses its start
    kept = _kept(messages, last)
    text = _text_of(kept[-1])

    async def measure(rest: str) -> int:
        return await model.prompt_tokens(
            {**body, "messages": [*kept[:-1], _with_text(kept[-1], rest)]})
    rest = await cut(measure, text, limit, keep_end=True)
    kept[-1] = _with_text(kept[-1], rest)
    what = f"dropped the {dropped} oldest of {len(messages)} messages and " if dropped else ""
    return {**body, "messages": kept}, f"{what}cut the start of the last message to fit " \
        f"({len(text) - len(rest)} of its {len(text)} characters)"


async def cut(measure: Callable[[str], Awaitable[int]], text: str, limit: int,
              keep_end: bool) -> str:
    """`text` cut (its start, or with keep_end false its end) until `measure` of it is at most
    `limit` tokens. Cut in characters of the text itself, in proportion to the tokens over,
    so what is kept is the client's own text (tokens turned back into text need not be)."""
    rest = text
    for _ in range(8):
        used = await measure(rest)
        if used <= limit:
            return rest
        own = await measure("")
        if own > limit:
            raise Unfit(f"the prompt without this text takes {own} tokens of the {limit} it "
                        "may have")
        per = len(rest) / max(used - own, 1)  # characters a token
        keep = max(0, len(rest) - int((used - limit + MARGIN) * per) - 1)
        rest = rest[len(rest) - keep:] if keep_end else rest[:keep]
    raise Unfit("the text did not come to fit")


async def fit_completion(model: Model, body: dict, n_ctx: int) -> tuple[dict, str]:
    """A raw prompt (/api/generate with raw) keeps its end."""
    prompt = body.get("prompt") or ""

    async def measure(rest: str) -> int:
        return len(await model.tokens(rest, special=True))
    rest = await cut(measure, prompt, room(body, n_ctx), keep_end=True)
    return {**body, "prompt": rest}, \
        f"cut the first {len(prompt) - len(rest)} of the prompt's {len(prompt)} characters"


async def fit_embed(model: Model, body: dict, limit: int) -> tuple[dict, str]:
    """Each input longer than the model takes keeps its start (Ollama's /api/embed)."""
    given = body["input"]
    texts = [given] if isinstance(given, str) else list(given)

    async def measure(rest: str) -> int:
        return len(await model.tokens(rest, special=True))
    cuts = 0
    for i, text in enumerate(texts):
        if await measure(text) > limit:
            texts[i], cuts = await cut(measure, text, limit, keep_end=False), cuts + 1
    if not cuts:
        raise Unfit("no input is longer than the model takes")
    return {**body, "input": texts[0] if isinstance(given, str) else texts}, \
        f"cut the end of {cuts} of {len(texts)} inputs to fit"
