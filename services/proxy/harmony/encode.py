"""An OpenAI chat request → the Harmony conversation GPT-OSS was trained on → prompt tokens.

System and developer messages become the developer message's instructions, tools the
`functions` namespace; earlier assistant turns keep their tool calls, and openai-harmony
drops earlier reasoning as the format requires (it keeps it across a turn's tool calls)."""

from __future__ import annotations

import json

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from shared.harmony_encoding import encoding

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM,
           "high": ReasoningEffort.HIGH}


class RequestError(ValueError):
    """A request Harmony cannot express; the message says which field and why."""


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    return content or ""


def _tools(payload: dict) -> list[ToolDescription]:
    tools = [t.get("function", {}) for t in payload.get("tools") or []
             if t.get("type", "function") == "function"]
    choice = payload.get("tool_choice")
    if choice == "none":
        return []
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.get("name") == wanted]
        if not tools:
            raise RequestError(f"tool_choice names {wanted!r}, which is not in tools")
    return [ToolDescription.new(t["name"], t.get("description", ""),
                                parameters=t.get("parameters")) for t in tools]


def conversation(payload: dict, default_effort: str = "medium") -> Conversation:
    effort = payload.get("reasoning_effort") or default_effort
    if effort not in EFFORTS:
        raise RequestError(f"reasoning_effort must be low, medium or high, not {effort!r}")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")

    instructions = [_text(m.get("content")) for m in messages
                    if m.get("role") in ("system", "developer")]
    tools = _tools(payload)
    out = [Message.from_role_and_content(
        Role.SYSTEM, SystemContent.new().with_reasoning_effort(EFFORTS[effort]))]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(i for i in instructions if i))
        if tools:
            dev = dev.with_function_tools(tools)
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    call_names: dict[str, str] = {}
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m.get("content"))))
        elif role == "assistant":
            if m.get("reasoning_content"):
                out.append(Message.from_role_and_content(
                    Role.ASSISTANT, m["reasoning_content"]).with_channel("analysis"))
            if _text(m.get("content")):
                out.append(Message.from_role_and_content(
                    Role.ASSISTANT, _text(m.get("content"))).with_channel("final"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                call_names[call.get("id", "")] = fn.get("name", "")
                args = fn.get("arguments") or "{}"
                out.append(Message.from_role_and_content(
                    Role.ASSISTANT, args if isinstance(args, str) else json.dumps(args))
                    .with_channel("commentary").with_recipient(f"functions.{fn.get('name')}")
                    .with_content_type("<|constrain|>json"))
        elif role == "tool":
            name = call_names.get(m.get("tool_call_id", "")) or m.get("name")
            if not name:
                raise RequestError("a tool message's tool_call_id matches no earlier "
                                   "assistant tool call")
            out.append(Message.from_author_and_content(
                Author.new(Role.TOOL, f"functions.{name}"), _text(m.get("content")))
                .with_channel("commentary").with_recipient("assistant"))
        else:
            raise RequestError(f"unknown message role {role!r}")
    return Conversation.from_messages(out)


def prompt_tokens(payload: dict, default_effort: str = "medium") -> list[int]:
    return encoding().render_conversation_for_completion(
        conversation(payload, default_effort), Role.ASSISTANT)
