"""Per-model llama-server flags from custom_models.yaml as checked [flag, *values] lists.

Checked when the catalog is built, against the option table of the llama-server that will
run them, so a mistake is reported with the file, model and key, and that model's settings
never reach an engine config. The engines render these lists in their own syntax.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field

from shared import engine_options
from shared.custom_models import ConfigError, CustomModel
from shared.engine_options import Options, OptionsError
from shared.llama_server import find_llama_server
from shared.settings import Settings

Option = list[str]  # [flag, *values]: a list, so the catalog's JSON reads back the same

_ADDRESS = "the engine chooses each model's address"
_ROUTER = "the engine runs the router with its own settings"
# Flags the engine sets for every model: a value from custom_models.yaml would fight it.
OWNED: dict[str, str] = {
    "--host": _ADDRESS, "--port": _ADDRESS, "--reuse-port": _ADDRESS,
    "-m": "the model file comes from the catalog (in `cmd`: -m ${MODEL_PATH} or -m FILE)",
    "--model": "the model file comes from the catalog (in `cmd`: -m ${MODEL_PATH} or -m FILE)",
    "-a": "set `aliases:` instead", "--alias": "set `aliases:` instead",
    "--api-key": "the engine sets the API key", "--api-key-file": "the engine sets the API key",
    "-c": "set `ctx_size:` instead (memory estimates use it)",
    "--ctx-size": "set `ctx_size:` instead (memory estimates use it)",
    "-np": "set `parallel:` instead (memory estimates use it)",
    "--parallel": "set `parallel:` instead (memory estimates use it)",
    "--models-dir": _ROUTER, "--models-preset": _ROUTER, "--models-max": _ROUTER,
    "--models-autoload": _ROUTER, "--no-models-autoload": _ROUTER,
    "--rpc": "set `rpc:` instead (the stack watches the workers and counts memory by it)",
}
_MODEL_FLAGS = ("-m", "--model")
_SHELL = set("();<>|&")


@dataclass
class ModelFlags:
    options: list[Option] = field(default_factory=list)
    binary: str | None = None  # `cmd`'s llama-server; None: the engine's own
    model: str | None = None  # `cmd`'s -m FILE


def flatten(options: list[Option]) -> list[str]:
    return [word for option in options for word in option]


def _looks_like_flag(word: str) -> bool:
    if len(word) < 2 or not word.startswith("-"):
        return False
    try:
        float(word)
    except ValueError:
        return True
    return False


def _values(n: int) -> str:
    return f"{n} value" + ("" if n == 1 else "s")


def split(words: list[str], table: Options | None) -> tuple[list[Option], list[str]]:
    """(options, problems). Without a table, a flag takes the one word after it unless that
    looks like a flag: names and counts go unchecked."""
    options: list[Option] = []
    problems: list[str] = []
    i = 0
    while i < len(words):
        flag = words[i]
        i += 1
        if table is not None and flag in table.values:
            wanted = table.values[flag]
        elif table is not None and flag.startswith("-"):
            problems.append(table.unknown(flag))
            while i < len(words) and not _looks_like_flag(words[i]):
                i += 1  # its values, most likely: one problem, not one per word
            continue
        elif table is None and _looks_like_flag(flag):
            wanted = int(i < len(words) and not _looks_like_flag(words[i]))
        else:
            after = f" ({options[-1][0]} before it takes {_values(len(options[-1]) - 1)})" \
                if options else ""
            problems.append(f"{flag!r}: not an option{after}")
            continue
        values: list[str] = []
        # a known flag where a value should be is a missing value, not the value
        while len(values) < wanted and i < len(words) and not (
                table is not None and words[i] in table.values):
            values.append(words[i])
            i += 1
        if len(values) < wanted:
            problems.append(f"{flag}: takes {_values(wanted)}, got {len(values)}")
            continue
        options.append([flag, *values])
    return options, problems


def _refused(options: list[Option]) -> list[str]:
    """Flags the engine sets itself, and `${...}`, which only `cmd` fills in (and llama-swap
    would read as its own macros)."""
    owned = [f"{option[0]}: set by the engine; {OWNED[option[0]]}"
             for option in options if option[0] in OWNED]
    return owned + [f"{option[0]} {value}: only ${{MODEL_PATH}}, and ${{PORT}} after --port, "
                    "are filled in, in `cmd`" for option in options for value in option[1:]
                    if "${" in value]


def _command(cmd: str, model_path: str, settings: Settings,
             problems: list[str]) -> tuple[ModelFlags, Options | None]:
    """`cmd`: one llama-server command line. Its binary runs under either engine; -m and
    --port ${PORT} become the engine's own; the rest is checked like sampler_args."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as e:
        problems.append(f"cannot split into arguments: {e}")
        return ModelFlags(), None
    shell = [w for w in words if set(w) <= _SHELL]
    if shell:
        problems.append(f"{' '.join(shell)}: shell syntax; no shell runs `cmd`, give one "
                        "llama-server command (its flags only)")
        return ModelFlags(), None
    if not words:
        problems.append("empty command")
        return ModelFlags(), None
    program, rest = words[0], words[1:]
    try:
        # a bare `llama-server` is the one model-serve runs, wherever that is installed
        binary = find_llama_server(settings) if program == "llama-server" \
            else shutil.which(program)
    except FileNotFoundError as e:
        binary, program = None, f"{program} ({e})"
    if binary is None:
        problems.append(f"{program}: no such program")
        return ModelFlags(), None
    try:
        table = engine_options.read(binary, settings.state_dir)
    except OptionsError as e:
        problems.append(f"{program}: the command must run a llama-server: {e}")
        return ModelFlags(), None
    if "${MODEL_PATH}" in cmd and not model_path:
        problems.append("${MODEL_PATH}: no model file has this name; give -m FILE")
    options, found = split([w.replace("${MODEL_PATH}", model_path) for w in rest], table)
    problems += found
    flags = ModelFlags(binary=binary)
    for option in options:
        if option[0] in _MODEL_FLAGS:
            flags.model = option[1]
        elif option != ["--port", "${PORT}"]:
            flags.options.append(option)
    problems += _refused(flags.options)
    return flags, table


def _setting_words(custom: CustomModel) -> list[tuple[str, list[str]]]:
    out = [("sampler_args", shlex.split(custom.get("sampler_args", "")))]
    if "jinja" in custom.settings:
        out.append(("jinja", ["--jinja" if custom.get("jinja") else "--no-jinja"]))
    if custom.get("chat_template_file"):
        out.append(("chat_template_file",
                    ["--chat-template-file", custom.get("chat_template_file")]))
    kwargs = custom.get("chat_template_kwargs")
    if kwargs:
        text = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
        out.append(("chat_template_kwargs", ["--chat-template-kwargs", text]))
    return out


def from_custom(custom: CustomModel, model_path: str, settings: Settings) -> ModelFlags:
    """The model's flags; ConfigError naming file, model, key and flag when any is wrong."""
    where = f"{settings.custom_models_file}: models.{custom.name}"
    problems: list[str] = []
    flags, table = ModelFlags(), None
    if custom.get("cmd"):
        found: list[str] = []
        flags, table = _command(custom.get("cmd"), model_path, settings, found)
        problems += [f"{where}.cmd: {p}" for p in found]
    else:
        table = engine_options.installed(settings)
    for key, words in _setting_words(custom):
        options, found = split(words, table)
        problems += [f"{where}.{key}: {p}" for p in found + _refused(options)]
        flags.options += options
    if problems:
        raise ConfigError(problems)
    return flags
