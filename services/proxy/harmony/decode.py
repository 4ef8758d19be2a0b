"""Harmony completion tokens → OpenAI chat deltas, token by token.

`final` becomes content, `analysis` reasoning_content, a commentary message to
`functions.X` a tool call (own index, id, name, arguments exactly as written, JSON or not),
and a commentary message to no one (a preamble) content. What cannot be parsed, a
malformed header or text after the last message, reaches the client as text, never lost,
and as it comes (text with no header at all is given up on after HEADER_LIMIT tokens)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from openai_harmony import HarmonyError, Role, StreamableParser

from shared.harmony_encoding import encoding

# Tokens a header may take (recipient, channel, content type) before the text is taken for
# plain text that never had one.
HEADER_LIMIT = 64


@dataclass
class Decoded:
    """Everything decoded so far, for a non-streamed answer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class HarmonyDecoder:
    def __init__(self) -> None:
        self.enc = encoding()
        self.stop_tokens = set(self.enc.stop_tokens_for_assistant_actions())
        self.header_starts = set(self.enc.encode("<|channel|><|start|>", allowed_special="all"))
        self.parser = StreamableParser(self.enc, role=Role.ASSISTANT)
        self.failed = False  # the parser gave up: the rest passes through as text
        self.stopped = False  # a stop token came: the answer is complete
        self.raw: list[int] = []
        # tokens fed since text was last emitted (a header being read): if the parser gives
        # up, they are part of the text the client gets
        self.unshown: list[int] = []
        self.calls = 0
        self._open_call: tuple[int, str] | None = None  # (message number, recipient)
        self.result = Decoded()

    def feed(self, tokens: list[int]) -> list[dict]:
        """OpenAI `delta` objects for these tokens."""
        deltas: list[dict] = []
        for token in tokens:
            if self.stopped:
                break
            if self.failed:
                self.raw.append(token)
                continue
            if token in self.stop_tokens:
                self.stopped = True
            done = len(self.parser.messages)
            try:
                self.parser.process(token)
            except HarmonyError:
                self.failed = True
                self.raw += self.unshown + [token]
                continue
            delta = self._delta()
            if delta or len(self.parser.messages) > done:
                self.unshown = []
            else:
                self.unshown.append(token)
                if len(self.unshown) > HEADER_LIMIT:  # no header is this long: plain text
                    self.failed = True
                    self.raw += self.unshown
            deltas += delta
        return deltas + self._flush_raw()

    def finish(self) -> list[dict]:
        """At the end of the stream: close a message cut short, and pass on what is left."""
        if not self.failed and not self.stopped:
            try:
                self.parser.process_eos()
            except HarmonyError:
                # cut inside a header (max_tokens): markup, not text; anything else is text
                if self.unshown and self.unshown[0] not in self.header_starts:
                    self.raw += self.unshown
        return self._flush_raw()

    def _flush_raw(self) -> list[dict]:
        if not self.raw:
            return []
        text = self.enc.decode(self.raw)
        self.raw = []
        self.result.content += text
        return [{"content": text}] if text else []

    def _delta(self) -> list[dict]:
        text = self.parser.last_content_delta
        if not text:
            return []
        channel, recipient = self.parser.current_channel, self.parser.current_recipient
        if recipient and recipient.startswith("functions."):
            return [self._tool_delta(recipient, text)]
        if channel == "analysis":
            self.result.reasoning += text
            return [{"reasoning_content": text}]
        self.result.content += text
        return [{"content": text}]

    def _tool_delta(self, recipient: str, text: str) -> dict:
        key = (len(self.parser.messages), recipient)
        if self._open_call != key:  # a new tool call message
            self._open_call = key
            call = {"index": self.calls, "id": f"call_{secrets.token_hex(12)}",
                    "type": "function",
                    "function": {"name": recipient.removeprefix("functions."),
                                 "arguments": text}}
            self.calls += 1
            self.result.tool_calls.append({k: v for k, v in call.items() if k != "index"}
                                          | {"function": dict(call["function"])})
            return {"tool_calls": [call]}
        self.result.tool_calls[-1]["function"]["arguments"] += text
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": text}}]}
