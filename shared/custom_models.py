"""config/custom_models.yaml: per-model settings and aliases, validated with clear errors.

Format (the original tool's): a top-level `models:` mapping from a model name (with or
without MODEL_PREFIX; `gemma3-12.2b-q8_0` and `gemma3:12.2b-q8_0` name the same model)
to its settings. An entry with `base_model` is an alias: the same file, its own id and
settings.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BACKENDS = ("engine", "ollama")
_TYPES: dict[str, tuple[type, ...]] = {
    "sampler_args": (str,),
    "ctx_size": (int,),
    "ttl": (int,),
    "parallel": (int,),
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
        known = ", ".join(sorted(_TYPES))
        problems.append(f"{where}: unknown key (known keys: {known})")
        return
    types = _TYPES[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        problems.append(f"{where}: expected {_type_name(types)}, got {value!r}")
        return
    if key in ("ctx_size", "parallel") and value < 1:
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


def load(file: Path) -> list[CustomModel]:
    """The file's entries in order; a missing file means no custom settings."""
    if not file.is_file():
        return []
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{file}: not valid YAML: {e}"]) from None
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror}"]) from None
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"models"}:
        raise ConfigError([f"{file}: expected a top-level 'models:' mapping and nothing else"])
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError([f"{file}: models: expected a mapping of model names to settings"])
    problems: list[str] = []
    out: list[CustomModel] = []
    for name, settings in models.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            problems.append(f"{file}: models.{name}: expected a mapping of settings")
            continue
        for key, value in settings.items():
            _check(file, str(name), str(key), value, problems)
        out.append(CustomModel(str(name), settings))
    if problems:
        raise ConfigError(problems)
    return out
