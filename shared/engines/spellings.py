"""Other spellings of llama-server values, which its preset file can hold: a value there
ends at `;` or `#` and at a line end, and loses the blanks at its edges."""

from __future__ import annotations

import json
import re

# llama-server parses these values as JSON (common/arg.cpp)
_JSON_FLAGS = ("--chat-template-kwargs", "-j", "--json-schema")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BLANKS = re.compile(r"[ \t\n\r]+")


def one_line_json(flag: str, value: str) -> str | None:
    """The same JSON on one line, without blanks at its edges and with `;` and `#` written
    as escapes, for a flag llama-server reads as JSON; None for another flag or a value
    that is not JSON. Rewritten as text, so that numbers stay exactly as they were."""
    if flag not in _JSON_FLAGS:
        return None
    try:
        json.loads(value)
    except (ValueError, RecursionError):
        return None
    # valid JSON has line breaks and `;` and `#` only as blanks between tokens or in strings
    out, at = [], 0
    for string in _JSON_STRING.finditer(value):
        out += [_JSON_BLANKS.sub("", value[at:string.start()]),
                string[0].replace(";", "\\u003b").replace("#", "\\u0023")]
        at = string.end()
    return "".join([*out, _JSON_BLANKS.sub("", value[at:])])


# `--samplers top_k;top_p` as `--sampling-seq kp`: llama.cpp's names and letters
# (common/sampling.cpp `common_sampler_types_from_names`, `common_sampler_type_to_chr`)
_LETTERS = {"dry": "d", "top_k": "k", "top_p": "p", "top_n_sigma": "s", "typ_p": "y",
            "min_p": "m", "temperature": "t", "xtc": "x", "infill": "i", "penalties": "e",
            "adaptive_p": "a"}
# each name with `_` is also read with `-` and without it; and three more spellings
_NAMES = {**{spelling: letter for name, letter in _LETTERS.items() if "_" in name
            for spelling in (name.replace("_", "-"), name.replace("_", ""))},
         "nucleus": "p", "temp": "t", "typ": "y", **_LETTERS}


def sampler_letters(samplers: str) -> tuple[str, list[str]]:
    """(letters, names llama-server does not know). It splits at each `;` and lowercases
    each name, nothing else; it passes over an empty name (and an unknown one, saying so)."""
    names = [name.lower() for name in samplers.split(";") if name]
    return "".join(_NAMES.get(name, "") for name in names), [n for n in names if n not in _NAMES]
