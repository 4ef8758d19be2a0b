"""config/custom_models.yaml: per-model settings and aliases, validated with clear errors.

Format (the original tool's): a top-level `models:` mapping from a model name (with or
without MODEL_PREFIX; `gemma3-12.2b-q8_0` and `gemma3:12.2b-q8_0` name the same model)
to its settings. An entry with `base_model` is an alias: the same file, its own id and
settings.
"""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BACKENDS = ("engine", "ollama")
_TYPES: dict[str, tuple[type, ...]] = {
    "sampler_args": (str,),
    "ctx_size": (int,),
    "ttl": (int,),
    "write_timeout": (int,),
    "parallel": (int,),
    "max_concurrent": (int,),
    "base_model": (str,),
    "cmd": (str,),
    "backend": (str,),
    "pin": (bool,),
    "jinja": (bool,),
    "chat_template_file": (str,),
    "chat_template_kwargs": (str, dict),
    "ollama_model": (str,),
    "aliases": (list,),
    "harmony": (str,),
    "reasoning_effort": (str,),
    "rpc": (list,),
}
HARMONY = ("proxy", "native", "off")
EFFORTS = ("low", "medium", "high")


class ConfigError(ValueError):
    """One or more problems, each naming the file, the model, the key and the reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class CustomModel:
    name: str
    settings: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.settings.get(key, default)


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", bool: "true or false",
             dict: "a mapping", list: "a list"}
    return " or ".join(names[t] for t in types)


def _check(file: Path, name: str, key: str, value, problems: list[str]) -> None:
    where = f"{file}: models.{name}.{key}"
    if key not in _TYPES:
        close = difflib.get_close_matches(key, _TYPES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        problems.append(f"{where}: unknown key ({hint}known keys: {', '.join(sorted(_TYPES))})")
        return
    types = _TYPES[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        problems.append(f"{where}: expected {_type_name(types)}, got {value!r}")
        return
    if key in ("ctx_size", "parallel", "max_concurrent", "write_timeout") and value < 1:
        problems.append(f"{where}: must be at least 1, got {value}")
    elif key == "ttl" and value < 0:
        problems.append(f"{where}: must be 0 or more seconds, got {value}")
    elif key == "backend" and value not in BACKENDS:
        problems.append(f"{where}: expected one of {', '.join(BACKENDS)}, got {value!r}")
    elif key == "harmony" and value not in HARMONY:
        problems.append(f"{where}: expected one of {', '.join(HARMONY)}, got {value!r}")
    elif key == "reasoning_effort" and value not in EFFORTS:
        problems.append(f"{where}: expected one of {', '.join(EFFORTS)}, got {value!r}")
    elif key in ("sampler_args", "cmd"):
        try:
            shlex.split(value)
        except ValueError as e:
            problems.append(f"{where}: cannot split into arguments: {e}")
    elif key == "aliases" and not all(isinstance(a, str) and a for a in value):
        problems.append(f"{where}: expected a list of names")
    elif key == "rpc":
        _check_rpc(where, value, problems)


def _check_rpc(where: str, value: list, problems: list[str]) -> None:
    from shared.rpc import parse_address

    if not value:
        problems.append(f"{where}: expected a list of rpc-server addresses (host:port), "
                        "got an empty list")
    for i, item in enumerate(value):
        try:
            parse_address(item)
        except ValueError as e:
            problems.append(f"{where}[{i}]: {e}")
    if len(set(value)) != len(value) and not problems:
        problems.append(f"{where}: a worker is named twice")


def read_yaml(file: Path) -> object:
    """The file's data (None when there is no file); ConfigError with one notice naming the
    file and the reason when it cannot be read or parsed at all."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror or e}"]) from None
    if not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError([f"{file}: line {line}: not UTF-8 text (byte "
                               f"0x{raw[e.start]:02x}); save it as UTF-8"]) from None
    try:
        return yaml.safe_load(raw)  # bytes: PyYAML finds UTF-8 or, by its BOM, UTF-16
    except RecursionError:
        raise ConfigError([f"{file}: not valid YAML: nested too deeply"]) from None
    except Exception as e:
        # Besides YAMLError, PyYAML's constructors raise plain ValueError (`2001-13-45`),
        # KeyError (`!!bool 7`) and more; for a hand-edited file any of them means the same.
        raise ConfigError([f"{file}: not valid YAML: {' '.join(str(e).split())}"]) from None


def load(file: Path) -> tuple[list[CustomModel], list[str]]:
    """The file's usable entries in order, and notices. Never raises: a file that cannot be
    parsed gives one notice and no entries; a bad entry is left out with its problems."""
    ignored = "; no custom settings are applied until it is fixed"
    try:
        data = read_yaml(file)
    except ConfigError as e:
        return [], [p + ignored for p in e.problems]
    if data is None:
        return [], []
    if not isinstance(data, dict):
        return [], [f"{file}: expected a top-level 'models:' mapping" + ignored]
    notices = [f"{file}: {key!r}: unknown top-level key, ignored (only 'models:' is read)"
               for key in data if key != "models"]
    models = data.get("models") or {}
    if not isinstance(models, dict):
        return [], [*notices, f"{file}: models: expected a mapping of model names to "
                    "settings" + ignored]
    out: list[CustomModel] = []
    for name, settings in models.items():
        if not isinstance(name, str) or not name:
            notices.append(f"{file}: models.{name!r}: a model name must be text; "
                           "entry ignored")
            continue
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            notices.append(f"{file}: models.{name}: expected a mapping of settings, got "
                           f"{settings!r:.60}; entry ignored")
            continue
        try:
            # YAML can hold what JSON cannot (a date, bytes, a list containing itself), and
            # the settings end up in the engine's arguments and catalog.json
            json.dumps(settings)
        except (TypeError, ValueError, RecursionError) as e:
            notices.append(f"{file}: models.{name}: a value that is not plain text, numbers, "
                           f"lists and mappings ({e}); entry ignored")
            continue
        problems: list[str] = []
        for key, value in settings.items():
            _check(file, name, str(key), value, problems)
        if problems:
            notices += [f"{p}; entry ignored" for p in problems]
        else:
            out.append(CustomModel(name, settings))
    return out, notices
