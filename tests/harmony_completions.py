"""Completions as a GPT-OSS model emits them, rendered by openai-harmony from assistant
messages: what follows the prompt's `<|start|>assistant`, ending in <|return|> or <|call|>."""

from __future__ import annotations

from openai_harmony import Message, Role

from shared.harmony_encoding import encoding


def analysis(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")


def final(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final")


def preamble(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("commentary")


def call(name: str, arguments: str) -> Message:
    return (Message.from_role_and_content(Role.ASSISTANT, arguments).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def special(text: str) -> list[int]:
    return encoding().encode(text, allowed_special="all")


def completion(*messages: Message) -> list[int]:
    enc = encoding()
    tokens: list[int] = []
    for m in messages:
        tokens += enc.render(m)
    prefix = special("<|start|>assistant")
    assert tokens[: len(prefix)] == prefix
    tokens = tokens[len(prefix):]
    end = special("<|end|>")[0]
    if tokens[-1] == end:
        last = messages[-1]
        tokens[-1] = special("<|call|>" if last.recipient else "<|return|>")[0]
    return tokens
