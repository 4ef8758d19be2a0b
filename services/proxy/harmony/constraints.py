"""What constrains a GPT-OSS answer on the Harmony path: the client's own `grammar`, a
`response_format`, or a `tool_choice` that requires a call.

A grammar or JSON schema given to llama-server's /completion applies from the first
generated token, which in Harmony is a channel header, not the answer. So a JSON answer or a
required call is started in the prompt itself (the assistant's header is written for the
model: `<|channel|>final<|message|>`, or the call's header), and the schema then shapes only
what follows. The reasoning channel is skipped in those answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.proxy.harmony.encode import RequestError
from shared.harmony_encoding import encoding

RETURN, CALL, ENDOFTEXT = 200002, 200012, 199999
@dataclass
class Constraints:
    prefill: list[int] = field(default_factory=list)  # the answer's start, written for it
    fields: dict = field(default_factory=dict)  # for /completion: grammar, json_schema
    end: int | None = None  # the one end-of-generation token allowed
    choose: list[dict] = field(default_factory=list)  # tools the model picks one of first


def _tokens(text: str) -> list[int]:
    return encoding().encode(text, allowed_special="all")


def _call_header(name: str) -> str:
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"


def call_of(tool: dict) -> Constraints:
    """A call of this function: its header written, its arguments shaped by its schema."""
    schema = tool.get("parameters") or {"type": "object"}
    return Constraints(_tokens(_call_header(tool["name"])), {"json_schema": schema}, CALL)


def choice_grammar(tools: list[dict]) -> str:
    """Only the header of a call, to one of these: the model picks, then a call of that
    function follows (a schema cannot be given per alternative within one grammar)."""
    names = " | ".join(f'"{t["name"]}"' for t in tools)
    return f'root ::= <[200005]> "commentary to=functions." ( {names} )'


def _required_call(payload: dict) -> Constraints | None:
    tools = [t.get("function") or {} for t in payload.get("tools") or []
             if isinstance(t, dict) and t.get("type", "function") == "function"]
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.get("name") == wanted]
    elif choice != "required":
        return None
    if not tools:
        return None
    return call_of(tools[0]) if len(tools) == 1 else Constraints(choose=tools)


def _json_answer(payload: dict) -> Constraints | None:
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        schema = {"type": "object"}
    elif fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
    else:
        raise RequestError(f"response_format type {fmt['type']!r}: expected text, "
                           "json_object or json_schema")
    return Constraints(_tokens("<|channel|>final<|message|>"), {"json_schema": schema}, RETURN)


def constraints(payload: dict) -> Constraints:
    """The client's grammar or schema as given (it then shapes the whole answer, headers
    included); else a required call; else a JSON answer."""
    given = {k: payload[k] for k in ("grammar", "json_schema") if payload.get(k)}
    if given:
        return Constraints([], given)
    return _required_call(payload) or _json_answer(payload) or Constraints()


def logit_bias(payload: dict, end: int | None) -> list | None:
    """The client's bias, plus: no end-of-generation token but `end`."""
    given = payload.get("logit_bias")
    bias = [[int(k), v] for k, v in given.items()] if isinstance(given, dict) else \
        list(given or [])
    if end is not None:
        bias += [[t, False] for t in (RETURN, CALL, ENDOFTEXT) if t != end]
    return bias or None
