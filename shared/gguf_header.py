"""GGUF metadata from the header alone: key/values and tensor shapes, never tensor data.

The gguf package's reader builds an array per vocabulary entry: 7 s here for a header with
150k tokens and 150k merges, against 0.2 s for this parser, which walks the header once,
skipping arrays it does not need, with the package's own type and file-type tables.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf import GGUFValueType, LlamaFileType

# The bridge stands alone; its magic-byte check serves here too.
from lm_studio_ollama_bridge.store import GGUF_MAGIC

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str
    basename: str
    size_label: str
    file_type: str
    param_count: int
    context_length: int
    block_count: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    is_projector: bool
    pooling_type: int = 0  # non-zero: an embedding model

    def to_dict(self) -> dict:
        return asdict(self)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise GGUFError("header ends inside a string")
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS and not keep:
                self.pos += struct.calcsize(_SCALARS[itype]) * count
                return None
            items = [self.value(itype, keep) for _ in range(count)]
            return items if keep else None
        raise GGUFError(f"unknown value type {vtype}")


# Arrays worth decoding: per-layer head counts of models whose layers differ.
_KEEP_ARRAYS = ("head_count", "head_count_kv")


def read_header(path: Path) -> GGUFInfo:
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:
            raise GGUFError("empty file") from e
    try:
        return _parse(_Cursor(buf))
    except struct.error as e:
        raise GGUFError(f"truncated header: {e}") from e
    finally:
        buf.close()


def _parse(cur: _Cursor) -> GGUFInfo:
    if cur.buf[:4] != GGUF_MAGIC:
        raise GGUFError("not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version < 2:
        raise GGUFError(f"GGUF version {version} is too old")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    kv: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        kv[key] = cur.value(vtype, keep=key.endswith(_KEEP_ARRAYS))
    params = 0
    for _ in range(n_tensors):
        cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        cur.unpack("<I")
        cur.unpack("<Q")
        count = 1
        for d in dims:
            count *= d
        params += count
    return _info(kv, params)


def _first(value: object) -> int:
    """Per-layer arrays count by their largest layer, which sizes the KV cache safely."""
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value or 0)


def _file_type(kv: dict[str, object]) -> str:
    ft = kv.get("general.file_type")
    if ft is None:
        return ""
    try:
        name = LlamaFileType(int(ft)).name
    except ValueError:
        return f"type{ft}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _info(kv: dict[str, object], params: int) -> GGUFInfo:
    arch = str(kv.get("general.architecture", ""))

    def a(key: str) -> object:
        return kv.get(f"{arch}.{key}", 0)

    heads = _first(a("attention.head_count"))
    embd = _first(a("embedding_length"))
    head_dim = embd // heads if heads else 0
    return GGUFInfo(
        architecture=arch,
        name=str(kv.get("general.name", "")),
        basename=str(kv.get("general.basename", "")),
        size_label=str(kv.get("general.size_label", "")),
        file_type=_file_type(kv),
        param_count=params,
        context_length=_first(a("context_length")),
        block_count=_first(a("block_count")),
        embedding_length=embd,
        feed_forward_length=_first(a("feed_forward_length")),
        head_count=heads,
        head_count_kv=_first(a("attention.head_count_kv")) or heads,
        key_length=_first(a("attention.key_length")) or head_dim,
        value_length=_first(a("attention.value_length")) or head_dim,
        is_projector=arch == "clip" or kv.get("general.type") == "mmproj",
        pooling_type=_first(a("pooling_type")),
    )
