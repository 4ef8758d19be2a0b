"""The catalog: every servable model with its id, aliases, file, backend and settings.

Built off the request path (by `model sync` and the engine service) and written to
STATE_DIR/catalog.json; the proxy and the governor only read that file.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lm_studio_ollama_bridge.links import LinkRecord
from shared import custom_models, engine_options, model_flags
from shared.custom_models import ConfigError, CustomModel
from shared.engine_options import Options, OptionsError
from shared.gguf_header import GGUFError, GGUFInfo
from shared.memory import CACHE_RAM_FLAGS, cache_ram_mib, cache_ram_option
from shared.metadata_cache import MetadataCache
from shared.model_files import SHARD, ModelFile, discover
from shared.model_flags import Option, flatten
from shared.model_ids import stable_ids
from shared.settings import Settings

GIB = 1024**3
# where llama-server writes a slot it is asked to save (services/proxy/models/context_cache.py)
SLOT_SAVE_FLAG = "--slot-save-path"


@dataclass
class Entry:
    id: str
    path: str
    mmproj: str | None = None
    aliases: list[str] = field(default_factory=list)
    backend: str = "engine"
    ctx_size: int = 8192
    parallel: int = 1
    max_concurrent: int | None = None  # answers at once; None: as many as its slots
    ttl: int = 1800
    write_timeout: int | None = None  # seconds a client may stop reading; None: WRITE_TIMEOUT
    options: list[Option] = field(default_factory=list)  # checked llama-server flags
    cmd: str | None = None  # as written in custom_models.yaml
    binary: str | None = None  # the llama-server `cmd` runs; None: the engine's own
    pin: bool = False
    size_bytes: int = 0
    base_model: str | None = None
    ollama: str | None = None  # the Ollama name of the same model, when Ollama has it
    ollama_tags: list[str] = field(default_factory=list)  # every tag Ollama has it under
    harmony: str = "off"  # proxy: the proxy speaks Harmony to it; native: the engine does
    reasoning_effort: str | None = None
    rpc: list[str] = field(default_factory=list)  # rpc-server workers (host:port)
    info: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    @property
    def at_once(self) -> int:
        """How many requests it answers at once; more wait in the proxy's queue."""
        return self.max_concurrent or self.parallel

    @property
    def args(self) -> list[str]:
        return flatten(self.options)


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
    prefix: str = ""  # MODEL_PREFIX: a name written without it resolves too
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
        """As written, without the colon, and either of those with MODEL_PREFIX before it:
        custom_models.yaml and users name models without the prefix."""
        full = self.prefix + name
        for candidate in (name, loose(name), full, loose(full)):
            if eid := self._index.get(candidate):
                return self.entries.get(eid)
        return None

    def closest(self, name: str, n: int = 3) -> list[str]:
        ids = list(self.entries)
        matches = difflib.get_close_matches(name, ids, n=n, cutoff=0.3)
        if not matches:
            needle = name.lower().split("/")[-1].split(":")[0]
            matches = [i for i in ids if needle and needle in i.lower()][:n]
        return matches

    def to_json(self) -> str:
        return json.dumps(
            {"prefix": self.prefix, "notices": self.notices,
             "entries": [asdict(e) for e in self.entries.values()]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        data = json.loads(text)
        # a file from an older version may hold fields since replaced (`args`)
        known = {f.name for f in fields(Entry)}
        entries = {e["id"]: Entry(**{k: v for k, v in e.items() if k in known})
                   for e in data.get("entries", [])}
        # files written before the prefix was stored have none: names resolve as written
        return cls(entries=entries, notices=data.get("notices", []),
                   prefix=data.get("prefix", ""))


def _apply(entry: Entry, custom: CustomModel, settings: Settings) -> None:
    """ConfigError, before the entry changes, when its llama-server flags are wrong."""
    flags = model_flags.from_custom(custom, entry.path, settings)
    entry.options, entry.binary = flags.options, flags.binary
    entry.path = flags.model or entry.path
    entry.ctx_size = custom.get("ctx_size", entry.ctx_size)
    entry.ttl = custom.get("ttl", entry.ttl)
    entry.write_timeout = custom.get("write_timeout", entry.write_timeout)
    entry.parallel = custom.get("parallel", entry.parallel)
    entry.max_concurrent = custom.get("max_concurrent", entry.max_concurrent)
    entry.backend = custom.get("backend", entry.backend)
    entry.pin = custom.get("pin", entry.pin)
    entry.cmd = custom.get("cmd", entry.cmd)
    entry.harmony = custom.get("harmony", entry.harmony)
    entry.reasoning_effort = custom.get("reasoning_effort", entry.reasoning_effort)
    entry.rpc = [a.strip() for a in custom.get("rpc", entry.rpc)]
    for alias in custom.get("aliases", []):
        if alias not in entry.aliases:
            entry.aliases.append(alias)
    if custom.get("ollama_model"):
        entry.ollama = custom.get("ollama_model")
        if entry.ollama not in entry.aliases:
            entry.aliases.append(entry.ollama)


def _model_id(model: ModelFile, info: GGUFInfo, prefix: str) -> str:
    name, tag = readable_name(model, info)
    return f"{prefix}{name}:{tag}"


def build(settings: Settings, roots: list[Path] | None = None) -> Catalog:
    """Scan the model folders and apply custom_models.yaml. Never raises for what the files
    hold: a file or an entry that cannot be used is left out with a notice."""
    cache = MetadataCache(settings.state_dir / "gguf-cache.json")
    notices: list[str] = []
    found: list[tuple[str, ModelFile, GGUFInfo]] = []  # (file as ids.json names it, ...)
    present: set[str] = set()
    for root in roots or [settings.models_dir]:
        files, root_notices = discover(root)
        notices += root_notices
        for model in files:
            # relative to MODELS_DIR, so ids survive the folder moving; the demo's in full
            file = str(model.rel) if root == settings.models_dir else str(model.path)
            present.add(file)
            try:
                info = cache.get(model.path)
            except (OSError, GGUFError) as e:
                notices.append(f"{model.path}: unreadable GGUF header ({e}), skipped")
                continue
            if not info.is_projector:
                found.append((file, model, info))
    cache.save()
    found.sort(key=lambda f: f[0])
    ids = stable_ids(settings.state_dir / "ids.json",
                     [(file, _model_id(model, info, settings.model_prefix))
                      for file, model, info in found], present)

    entries: dict[str, Entry] = {}
    for (_, model, info), mid in zip(found, ids, strict=True):
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
    catalog = Catalog(entries=dict(sorted(entries.items())), notices=notices,
                      prefix=settings.model_prefix)
    _apply_harmony_list(catalog, settings)
    _apply_custom(catalog, settings)
    _give_caches(catalog, settings)
    return catalog


def _give_caches(catalog: Catalog, settings: Settings) -> None:
    """A --cache-ram for each model an engine runs: llama-server's own default lets every
    process keep 8 GiB of prompts, which no memory estimate could foresee. One given in
    custom_models.yaml stands; a llama-server that knows no --cache-ram keeps no such
    cache, and one that cannot be asked is left as it is. With CONTEXT_CACHE_GB, each also
    gets --slot-save-path, the folder its slots are saved to before it leaves (unless
    custom_models.yaml gives it a folder of its own, which the stack then leaves alone)."""
    tables: dict[str | None, Options | None] = {None: engine_options.installed(settings)}
    slots_saved = _context_cache_dir(catalog, settings)
    for entry in catalog.entries.values():
        if entry.backend != "engine":
            continue
        if entry.binary not in tables:
            try:
                tables[entry.binary] = engine_options.read(entry.binary, settings.state_dir)
            except OptionsError:
                tables[entry.binary] = None
        table = tables[entry.binary]
        if table is None:
            continue
        if CACHE_RAM_FLAGS[0] in table.values and not cache_ram_option(entry):
            entry.options.append([CACHE_RAM_FLAGS[0],
                                  str(cache_ram_mib(entry, settings.cache_ram_mib))])
        if slots_saved and SLOT_SAVE_FLAG in table.values and \
                not any(o[0] == SLOT_SAVE_FLAG for o in entry.options):
            entry.options.append([SLOT_SAVE_FLAG, str(settings.context_cache_dir)])


def _context_cache_dir(catalog: Catalog, settings: Settings) -> bool:
    """Whether models' slots can be saved: CONTEXT_CACHE_GB is not 0 and its folder is there
    (llama-server refuses to start with a --slot-save-path that is not a folder)."""
    if not settings.context_cache_bytes:
        return False
    try:
        settings.context_cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        catalog.notices.append(f"CONTEXT_CACHE_DIR={settings.context_cache_dir}: cannot be "
                               f"made ({e.strerror or e}); no model's context is saved")
        return False
    return True


def embeddings_by_ollama(settings: Settings, entry: Entry) -> bool:
    """Whether Ollama answers this model's embeddings: a model Ollama has under a name
    matching EMBEDDINGS_TO_OLLAMA (e.g. nomic-embed-text), or one Ollama answers in all."""
    if entry.backend == "ollama":
        return True
    names = (entry.id.lower(), (entry.ollama or "").lower())
    return bool(entry.ollama) and any(word in n for word in settings.embeddings_to_ollama
                                      for n in names)


def _add_ollama_names(entries: dict[str, Entry], settings: Settings) -> None:
    """The names a user pulled with Ollama become aliases of the model made from the same
    blob; a name matching ROUTE_TO_OLLAMA (e.g. mxfp4) is answered by Ollama itself."""
    record = LinkRecord.load(settings.bridge_record)
    names, tags = record.names_by_path(), record.tags_by_path()
    for entry in entries.values():
        pulled = names.get(entry.path, [])
        if not pulled:
            continue
        entry.ollama = pulled[0]
        entry.ollama_tags = tags.get(entry.path) or [pulled[0]]
        entry.aliases += [n for n in pulled if n not in entry.aliases]
        text = f"{entry.id} {entry.ollama}".lower()
        if any(word in text for word in settings.route_to_ollama):
            entry.backend = "ollama"


def _apply_harmony_list(catalog: Catalog, settings: Settings) -> None:
    """config/harmony_models.yaml (`harmony_models: [names]`): more models that speak
    Harmony than the GGUF architecture shows, e.g. fine-tunes under another name."""
    file = settings.config_dir / "harmony_models.yaml"
    try:
        data = custom_models.read_yaml(file)
    except ConfigError as e:
        catalog.notices += [f"{p}; the list is ignored" for p in e.problems]
        return
    if data is None:
        return
    names = (data.get("harmony_models") or []) if isinstance(data, dict) else None
    if not isinstance(names, list):
        catalog.notices.append(f"{file}: expected 'harmony_models:' and a list of model names; "
                               "the list is ignored")
        return
    for name in names:
        if entry := catalog.resolve(str(name)):
            entry.harmony = "proxy"
        else:
            catalog.notices.append(f"{file}: {name}: no such model; ignored until there is one")


def _apply_custom(catalog: Catalog, settings: Settings) -> None:
    """custom_models.yaml entry by entry: one that cannot apply is left out with notices
    naming the file, model, key and reason, and every other entry still applies."""
    customs, notices = custom_models.load(settings.custom_models_file)
    catalog.notices += notices
    settled: dict[str, str] = {}  # entry id → the name of the entry that set it
    for custom in customs:
        if not custom.get("base_model"):
            _apply_settings(catalog, settings, custom, settled)
    catalog.reindex()
    for custom in customs:
        if custom.get("base_model"):
            _add_alias(catalog, settings, custom)


def _applied(base: Entry, custom: CustomModel, settings: Settings, where: str, outcome: str,
             notices: list[str]) -> Entry | None:
    """A copy of `base` with the entry's settings, or None and notices when they cannot
    apply; the copy, so that settings failing halfway leave `base` as it was."""
    entry = copy.deepcopy(base)
    try:
        _apply(entry, custom, settings)
    except ConfigError as e:
        notices += [f"{p}; {outcome}" for p in e.problems]
        return None
    if entry.backend == "ollama" and not entry.ollama:
        notices.append(f"{where}.backend: ollama, but Ollama does not have this model (pull it "
                       f"with Ollama or set ollama_model); {outcome}")
        return None
    return entry


def _apply_settings(catalog: Catalog, settings: Settings, custom: CustomModel,
                    settled: dict[str, str]) -> None:
    where = f"{settings.custom_models_file}: models.{custom.name}"
    entry = catalog.resolve(custom.name)
    if entry is None and not custom.get("cmd"):
        catalog.notices.append(f"{where}: no model file with this name is installed; "
                               "its settings wait until one is")
        return
    if entry is not None and entry.id in settled:
        catalog.notices.append(f"{where}: {entry.id} already has its settings from "
                               f"models.{settled[entry.id]}; entry ignored")
        return
    if entry is None:  # a `cmd` model: the command is the model
        base = Entry(id=_prefixed(custom.name, settings), path="",
                     ctx_size=settings.default_ctx_size, parallel=settings.default_parallel,
                     ttl=settings.model_ttl)
        outcome = "entry ignored"
    else:
        base, outcome = entry, f"entry ignored, {entry.id} is served with default settings"
    applied = _applied(base, custom, settings, where, outcome, catalog.notices)
    if applied is not None:
        _drop_taken_names(catalog, applied, where)
        catalog.entries[applied.id] = applied
        settled[applied.id] = custom.name


def _add_alias(catalog: Catalog, settings: Settings, custom: CustomModel) -> None:
    where = f"{settings.custom_models_file}: models.{custom.name}"
    base_name = custom.get("base_model")
    base = catalog.resolve(base_name)
    if base is None:
        hint = catalog.closest(_prefixed(base_name, settings))
        catalog.notices.append(f"{where}.base_model: no model named {base_name!r}"
                               + (f" (closest: {', '.join(hint)})" if hint else "")
                               + "; alias ignored")
        return
    aid = _prefixed(custom.name, settings)
    if taken := catalog.resolve(aid):
        catalog.notices.append(f"{where}: the name is already {taken.id}'s; alias ignored")
        return
    alias = Entry(id=aid, path=base.path, mmproj=base.mmproj, backend=base.backend,
                  ctx_size=base.ctx_size, parallel=base.parallel,
                  max_concurrent=base.max_concurrent, ttl=base.ttl,
                  write_timeout=base.write_timeout,
                  size_bytes=base.size_bytes, base_model=base.id, info=base.info)
    if applied := _applied(alias, custom, settings, where, "alias ignored",
                            catalog.notices):
        _drop_taken_names(catalog, applied, where)
        catalog.entries[aid] = applied
        catalog.reindex()  # the next alias must see this one's names as taken


def _drop_taken_names(catalog: Catalog, entry: Entry, where: str) -> None:
    """A name points at one model: a name the entry would add that another model has (its
    id, with or without MODEL_PREFIX, or an alias given earlier) stays with that model."""
    def spelling(name: str) -> str:  # every spelling that resolves to the same model
        return loose(name.removeprefix(catalog.prefix))

    owners = {spelling(name): other.id for other in catalog.entries.values()
              if other.id != entry.id for name in other.names}
    for name in [n for n in entry.aliases if spelling(n) in owners]:
        entry.aliases.remove(name)
        catalog.notices.append(f"{where}: the name {name!r} is already "
                               f"{owners[spelling(name)]}'s; not given to {entry.id}")


def _prefixed(name: str, settings: Settings) -> str:
    return name if name.startswith(settings.model_prefix) else settings.model_prefix + name
