"""Engine models described in Ollama's shapes: /api/tags rows, /api/show, /api/ps rows.
Everything that touches the disk runs in a thread."""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
from datetime import UTC, datetime

from services.proxy.ollama.chat import preset_options
from shared.catalog import Entry
from shared.gguf_header import GGUFError, _Cursor
from shared.model_kinds import GENERATE, kind

# Ollama's blobs are named for their digest: a model linked from Ollama keeps Ollama's.
_BLOB = re.compile(r"sha256-([0-9a-f]{64})$")
# Keys that /api/show gives elsewhere (`template`) or that only name the GGUF's own files.
_NOT_INFO = ("tokenizer.chat_template",)
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)  # how Ollama shows a model that never expires


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def parameter_size(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def details(entry: Entry) -> dict:
    arch = entry.info.get("architecture", "")
    return {"parent_model": entry.base_model or "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": parameter_size(entry.info.get("param_count", 0)),
            "quantization_level": entry.info.get("file_type", "").upper()}


def file_facts(entries: list[Entry]) -> dict[str, tuple[float, str]]:
    """Blocking: id → (modified time, digest). The digest of a model linked from Ollama is
    its blob's; of any other, one made from the file's name, size and time."""
    out = {}
    for entry in entries:
        try:
            real = os.path.realpath(entry.path)
            mtime = os.stat(real).st_mtime
        except OSError:
            real, mtime = entry.path, 0.0
        if m := _BLOB.search(os.path.basename(real)):
            digest = m.group(1)
        else:
            digest = hashlib.sha256(f"{real}\0{entry.size_bytes}\0{mtime}".encode()).hexdigest()
        out[entry.id] = (mtime, digest)
    return out


def tag(entry: Entry, name: str, facts: tuple[float, str]) -> dict:
    """An /api/tags row; its details also give the trained context and the width, as
    Ollama's (0.33) do."""
    mtime, digest = facts
    sizes = {"context_length": entry.info.get("context_length", 0),
             "embedding_length": entry.info.get("embedding_length", 0)}
    return {"name": name, "model": name, "modified_at": iso(mtime), "size": entry.size_bytes,
            "digest": digest, "details": {**details(entry), **sizes}}


def listed_name(entry: Entry, ollama_rows: list[dict]) -> str:
    """The name /api/tags lists the model under, which clients (Open WebUI) match /api/ps
    against: of a model Ollama has under several tags, the one Ollama's /api/tags lists first;
    else its Ollama name, else its id."""
    names = entry.ollama_tags or [entry.ollama or entry.id]
    order = [m.get("name") for m in ollama_rows]
    listed = [n for n in order if n in names]
    return listed[0] if listed else entry.ollama or names[0]


def ps_row(entry: Entry, row: dict, facts: tuple[float, str], name: str = "") -> dict:
    """One of /running's rows (manage.running_models) as an /api/ps row, under `name`, the
    name /api/tags lists it under (listed_name)."""
    memory = row.get("memory") or {}
    size = memory.get("measured") or memory.get("estimated") or entry.size_bytes
    expires = iso(row["expires_at"]) if row.get("expires_at") else FOREVER.isoformat()
    return {**tag(entry, name or entry.id, facts), "details": details(entry), "size": size,
            "size_vram": 0, "expires_at": expires, "context_length": entry.ctx_size}


@functools.lru_cache(maxsize=32)
def _header_kv(path: str, _stamp: tuple[int, int]) -> dict[str, object]:
    """The header's key/values, arrays left out (vocabularies: Ollama leaves them out of
    /api/show too); cached per file version."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf)
        cur.pos = 8  # magic and version: the catalog read this header already
        cur.unpack("<Q")  # tensor count
        kv = {}
        for _ in range(cur.unpack("<Q")):
            key = cur.string()
            value = cur.value(cur.unpack("<I"), keep=False)
            if value is not None:
                kv[key] = value
        return kv
    finally:
        buf.close()


def header_kv(path: str) -> dict[str, object]:
    """Blocking. Empty for a model without a readable file (a `cmd` model)."""
    try:
        st = os.stat(path)
        return _header_kv(path, (st.st_mtime_ns, st.st_size))
    except (OSError, ValueError, GGUFError):
        return {}


def listed_capabilities(entries: list[Entry]) -> dict[str, list[str]]:
    """Blocking: id → capabilities, as Ollama's (0.33) /api/tags rows carry them."""
    out = {}
    for entry in entries:
        template = header_kv(entry.path).get("tokenizer.chat_template")
        out[entry.id] = capabilities(entry, template if isinstance(template, str) else "")
    return out


def capabilities(entry: Entry, template: str) -> list[str]:
    if (what := kind(entry.info, entry.args)) != GENERATE:
        return [what]  # "rerank" is not Ollama's, but tells a client it is no embedder
    caps = ["completion"]
    if entry.harmony != "off" or "tools" in template:
        caps.append("tools")
    if entry.harmony != "off" or any(w in template for w in (
            "reasoning_content", "<think>", "enable_thinking")):
        caps.append("thinking")
    if entry.mmproj:
        caps.append("vision")
    return caps


def show(entry: Entry, kv: dict[str, object], mtime: float) -> dict:
    template = kv.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else ""
    info = {k: v for k, v in kv.items() if k not in _NOT_INFO}
    info["general.parameter_count"] = entry.info.get("param_count", 0)
    parameters = "\n".join(f"{k} {v}" for k, v in preset_options(entry).items())
    modelfile = f"# served by model-serve's engine\nFROM {entry.path}\n" + "".join(
        f"PARAMETER {p}\n" for p in parameters.splitlines())
    if entry.args:
        modelfile += f"# llama-server {' '.join(entry.args)}\n"
    return {"modelfile": modelfile, "parameters": parameters, "template": template,
            "details": details(entry), "model_info": info,
            "capabilities": capabilities(entry, template), "modified_at": iso(mtime)}
