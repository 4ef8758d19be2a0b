"""The catalog: every servable model with its id, aliases, file, backend and settings.

Built off the request path (by `model sync` and the engine service) and written to
STATE_DIR/catalog.json; the proxy and the governor only read that file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lm_studio_ollama_bridge.links import LinkRecord
from shared import custom_models
from shared.custom_models import ConfigError, CustomModel
from shared.gguf_header import GGUFError, GGUFInfo
from shared.metadata_cache import MetadataCache
from shared.model_files import SHARD, ModelFile, discover
from shared.settings import Settings

GIB = 1024**3


@dataclass
class Entry:
    id: str
    path: str
    mmproj: str | None = None
    aliases: list[str] = field(default_factory=list)
    backend: str = "engine"
    ctx_size: int = 8192
    parallel: int = 1
    ttl: int = 1800
    args: list[str] = field(default_factory=list)
    cmd: str | None = None
    pin: bool = False
    size_bytes: int = 0
    base_model: str | None = None
    ollama: str | None = None  # the Ollama name of the same model, when Ollama has it
    harmony: str = "off"  # proxy: the proxy speaks Harmony to it; native: the engine does
    reasoning_effort: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]


def slug(text: str) -> str:
    text = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    return re.sub(r"-{2,}", "-", text).strip("-.")


def loose(name: str) -> str:
    """The colon-free spelling some clients need: `gemma3:12.2b-q8_0` → `gemma3-12.2b-q8_0`."""
    return name.replace(":", "-")


def params_label(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}b"
    return f"{count / 1e6:.1f}m"


_QUANT = re.compile(r"(?:^|[-_.])((?:i?q\d[a-z0-9_]*)|bf16|f16|f32|mxfp4)$", re.IGNORECASE)


def readable_name(model: ModelFile, info: GGUFInfo) -> tuple[str, str]:
    """(name, tag) such as ("gemma3", "12.2b-q8_0")."""
    stem = SHARD.sub("", model.path.name)
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    quant = info.file_type
    if not quant:
        m = _QUANT.search(stem)
        quant = m.group(1).lower() if m else "unknown"
    parts = model.rel.parts
    if len(parts) >= 3 and parts[0] == "ollama":
        name = parts[1]  # the bridge names the folder after the Ollama model
    else:
        name = _QUANT.sub("", stem) if _QUANT.search(stem) else stem
    tag = f"{params_label(info.param_count)}-{quant}"
    return slug(name) or slug(info.architecture) or "model", tag


def default_ctx(settings: Settings, size_bytes: int, trained: int) -> int:
    ctx = settings.default_ctx_size
    if size_bytes > 50 * GIB:
        ctx = min(ctx, 2048)
    elif size_bytes > 30 * GIB:
        ctx = min(ctx, 4096)
    return min(ctx, trained) if trained else ctx


@dataclass
class Catalog:
    entries: dict[str, Entry] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    _index: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        """Every spelling a client may use → canonical id; exact ids and aliases win."""
        index: dict[str, str] = {}
        for entry in self.entries.values():
            for name in entry.names:
                index.setdefault(loose(name), entry.id)
        for entry in self.entries.values():
            for name in entry.names:
                index[name] = entry.id
        self._index = index

    def resolve(self, name: str) -> Entry | None:
        eid = self._index.get(name) or self._index.get(loose(name))
        return self.entries.get(eid) if eid else None

    def closest(self, name: str, n: int = 3) -> list[str]:
        ids = list(self.entries)
        matches = difflib.get_close_matches(name, ids, n=n, cutoff=0.3)
        if not matches:
            needle = name.lower().split("/")[-1].split(":")[0]
            matches = [i for i in ids if needle and needle in i.lower()][:n]
        return matches

    def to_json(self) -> str:
        return json.dumps(
            {"notices": self.notices, "entries": [asdict(e) for e in self.entries.values()]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        data = json.loads(text)
        entries = {e["id"]: Entry(**e) for e in data.get("entries", [])}
        return cls(entries=entries, notices=data.get("notices", []))


def _custom_args(custom: CustomModel) -> list[str]:
    args = shlex.split(custom.get("sampler_args", ""))
    if "jinja" in custom.settings:
        args.append("--jinja" if custom.get("jinja") else "--no-jinja")
    if custom.get("chat_template_file"):
        args += ["--chat-template-file", custom.get("chat_template_file")]
    kwargs = custom.get("chat_template_kwargs")
    if kwargs:
        text = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
        args += ["--chat-template-kwargs", text]
    return args


def _apply(entry: Entry, custom: CustomModel) -> None:
    entry.args = _custom_args(custom)
    entry.ctx_size = custom.get("ctx_size", entry.ctx_size)
    entry.ttl = custom.get("ttl", entry.ttl)
    entry.parallel = custom.get("parallel", entry.parallel)
    entry.backend = custom.get("backend", entry.backend)
    entry.pin = custom.get("pin", entry.pin)
    entry.cmd = custom.get("cmd", entry.cmd)
    entry.harmony = custom.get("harmony", entry.harmony)
    entry.reasoning_effort = custom.get("reasoning_effort", entry.reasoning_effort)
    for alias in custom.get("aliases", []):
        if alias not in entry.aliases:
            entry.aliases.append(alias)
    if custom.get("ollama_model"):
        entry.ollama = custom.get("ollama_model")
        if entry.ollama not in entry.aliases:
            entry.aliases.append(entry.ollama)


def _unique_ids(found: list[tuple[ModelFile, GGUFInfo]], prefix: str) -> list[str]:
    """Stable ids for files sorted by path; of two that would share one, the first keeps it."""
    ids: list[str] = []
    for model, info in found:
        name, tag = readable_name(model, info)
        mid = f"{prefix}{name}:{tag}"
        if mid in ids:
            mid += "-" + hashlib.sha1(str(model.rel).encode()).hexdigest()[:6]
        ids.append(mid)
    return ids


def build(settings: Settings, roots: list[Path] | None = None) -> Catalog:
    """Scan the model folders and apply custom_models.yaml. Raises ConfigError."""
    cache = MetadataCache(settings.state_dir / "gguf-cache.json")
    notices: list[str] = []
    found: list[tuple[ModelFile, GGUFInfo]] = []
    for root in roots or [settings.models_dir]:
        files, root_notices = discover(root)
        notices += root_notices
        for model in files:
            try:
                found.append((model, cache.get(model.path)))
            except (OSError, GGUFError) as e:
                notices.append(f"{model.path}: unreadable GGUF header ({e}), skipped")
    cache.save()
    found.sort(key=lambda mi: str(mi[0].rel))

    entries: dict[str, Entry] = {}
    for (model, info), mid in zip(found, _unique_ids(found, settings.model_prefix), strict=True):
        if info.is_projector:
            continue
        entries[mid] = Entry(
            id=mid,
            path=str(model.path),
            harmony="proxy" if info.architecture == "gpt-oss" else "off",
            mmproj=str(model.mmproj) if model.mmproj else None,
            ctx_size=default_ctx(settings, model.size, info.context_length),
            parallel=settings.default_parallel,
            ttl=settings.model_ttl,
            size_bytes=model.size,
            info=info.to_dict(),
        )
    _add_ollama_names(entries, settings)
    catalog = Catalog(entries=dict(sorted(entries.items())), notices=notices)
    _apply_harmony_list(catalog, settings)
    _apply_custom(catalog, settings)
    return catalog


def _add_ollama_names(entries: dict[str, Entry], settings: Settings) -> None:
    """The names a user pulled with Ollama become aliases of the model made from the same
    blob; a name matching ROUTE_TO_OLLAMA (e.g. mxfp4) is answered by Ollama itself."""
    names = LinkRecord.load(settings.bridge_record).names_by_path()
    for entry in entries.values():
        pulled = names.get(entry.path, [])
        if not pulled:
            continue
        entry.ollama = pulled[0]
        entry.aliases += [n for n in pulled if n not in entry.aliases]
        text = f"{entry.id} {entry.ollama}".lower()
        if any(word in text for word in settings.route_to_ollama):
            entry.backend = "ollama"


def _apply_harmony_list(catalog: Catalog, settings: Settings) -> None:
    """config/harmony_models.yaml (`harmony_models: [names]`): more models that speak
    Harmony than the GGUF architecture shows, e.g. fine-tunes under another name."""
    file = settings.config_dir / "harmony_models.yaml"
    if not file.is_file():
        return
    try:
        data = yaml.safe_load(file.read_text()) or {}
        names = data.get("harmony_models") or []
        if not isinstance(names, list):
            raise TypeError
    except (yaml.YAMLError, OSError, AttributeError, TypeError):
        raise ConfigError([f"{file}: expected 'harmony_models:' and a list of model names"]) \
            from None
    for name in names:
        entry = catalog.resolve(str(name)) or catalog.resolve(settings.model_prefix + str(name))
        if entry:
            entry.harmony = "proxy"
        else:
            catalog.notices.append(f"{file}: {name}: no such model; ignored until there is one")


def _apply_custom(catalog: Catalog, settings: Settings) -> None:
    file = settings.custom_models_file
    problems: list[str] = []
    customs = custom_models.load(file)
    aliases: list[CustomModel] = []
    for custom in customs:
        if custom.get("base_model"):
            aliases.append(custom)
            continue
        entry = catalog.resolve(custom.name) or catalog.resolve(settings.model_prefix + custom.name)
        if entry is None:
            if custom.get("cmd"):
                entry = Entry(id=_prefixed(custom.name, settings), path="",
                              ctx_size=settings.default_ctx_size,
                              parallel=settings.default_parallel, ttl=settings.model_ttl)
                catalog.entries[entry.id] = entry
            else:
                catalog.notices.append(
                    f"{file}: models.{custom.name}: no model file with this name is installed; "
                    "its settings wait until one is")
                continue
        _apply(entry, custom)
    catalog.reindex()
    for custom in aliases:
        base_name = custom.get("base_model")
        base = catalog.resolve(base_name) or catalog.resolve(settings.model_prefix + base_name)
        if base is None:
            hint = catalog.closest(settings.model_prefix + base_name)
            problems.append(
                f"{file}: models.{custom.name}.base_model: no model named {base_name!r}"
                + (f" (closest: {', '.join(hint)})" if hint else ""))
            continue
        aid = _prefixed(custom.name, settings)
        if aid in catalog.entries:
            problems.append(f"{file}: models.{custom.name}: the name is already a model's id")
            continue
        entry = Entry(id=aid, path=base.path, mmproj=base.mmproj, backend=base.backend,
                      ctx_size=base.ctx_size, parallel=base.parallel, ttl=base.ttl,
                      size_bytes=base.size_bytes, base_model=base.id, info=base.info)
        _apply(entry, custom)
        catalog.entries[aid] = entry
    for entry in catalog.entries.values():
        if entry.backend == "ollama" and not entry.ollama:
            problems.append(f"{file}: {entry.id}: backend is ollama but Ollama does not have "
                            "this model; pull it with Ollama or set ollama_model")
    taken: dict[str, str] = {}
    for entry in catalog.entries.values():
        for name in entry.names:
            if name in taken and taken[name] != entry.id:
                problems.append(f"{file}: the name {name!r} is used by both "
                                f"{taken[name]} and {entry.id}")
            taken[name] = entry.id
    if problems:
        raise ConfigError(problems)
    catalog.reindex()


def _prefixed(name: str, settings: Settings) -> str:
    return name if name.startswith(settings.model_prefix) else settings.model_prefix + name
