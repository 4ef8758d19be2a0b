"""Reads a presets.ini the way llama-server does (common/preset.cpp `parse_ini_from_file`):
the same PEG grammar, tried line by line in the same order, with the same results."""

from __future__ import annotations

import re

DEFAULT = "default"  # COMMON_PRESET_DEFAULT_NAME: keys before any section header
_NL = r"(?:\r\n|\n|\r)"
_EOL = rf"[ \t]*(?:[;#](?:(?!{_NL}).)*)?(?:{_NL}|\Z)"
_HEADER = re.compile(rf"\[[ \t]*([^\]]+)[ \t]*\]{_EOL}", re.S)
_KV = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_.-]*)[ \t]*=[ \t]*"
                 rf"((?:(?![ \t]*(?:[;#]|{_NL}|\Z)).)*){_EOL}", re.S)
_COMMENT = re.compile(rf"[ \t]*[;#](?:(?!{_NL}).)*(?:{_NL}|\Z)", re.S)
_BLANK = re.compile(rf"[ \t]*(?:{_NL}|\Z)", re.S)


def parse_preset(text: str) -> dict[str, dict[str, str]]:
    """Section → key → value; ValueError where llama-server would fail to parse the file."""
    parsed: dict[str, dict[str, str]] = {}
    section = DEFAULT
    pos = 0
    while pos < len(text):
        if m := _HEADER.match(text, pos):
            section = m[1]
            parsed[section] = {}  # as llama-server does: a repeated header starts afresh
        elif m := _KV.match(text, pos):
            parsed.setdefault(section, {})[m[1]] = m[2]
        elif not (m := _COMMENT.match(text, pos) or _BLANK.match(text, pos)) or m.end() == pos:
            raise ValueError(f"llama-server cannot parse the preset at {text[pos:pos + 60]!r}")
        pos = m.end()
    return parsed
