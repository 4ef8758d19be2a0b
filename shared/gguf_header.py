"""GGUF metadata from the header alone: key/values and tensor shapes, never tensor data.

The gguf package's reader builds an array per vocabulary entry: 7 s here for a header with
150k tokens and 150k merges, against 0.2 s for this parser, which walks the header once,
skipping arrays it does not need, with the package's own type and file-type tables.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# The bridge stands alone; its magic-byte check serves here too.
from lm_studio_ollama_bridge.store import GGUF_MAGIC


@functools.cache
def _scalars() -> dict[int, str]:
    """The package's value types (imported on first use: it brings numpy, which the `model`
    command would otherwise load on every start)."""
    from gguf import GGUFValueType as T

    return {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
            T.INT32: "<i", T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q",
            T.FLOAT64: "<d"}


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
    # the file's own sampler order (`top_k;top_p`), which llama-server prefers to a
    # --sampling-seq given for the model, not to --samplers
    sampling_sequence: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> GGUFInfo | None:
        """What to_dict gave, or None for anything else (a damaged cache file)."""
        kinds = {"str": str, "int": int, "bool": bool}
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            return None
        if all(type(data[f.name]) is kinds[f.type] for f in fields(cls)):
            return cls(**data)
        return None


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        from gguf import GGUFValueType

        self.buf = buf
        self.pos = 0
        self.scalars = _scalars()
        self.string_type, self.array_type = GGUFValueType.STRING, GGUFValueType.ARRAY

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
        if vtype in self.scalars:
            return self.unpack(self.scalars[vtype])
        if vtype == self.string_type:
            return self.string()
        if vtype == self.array_type:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in self.scalars and not keep:
                self.pos += struct.calcsize(self.scalars[itype]) * count
                return None
            items = [self.value(itype, keep) for _ in range(count)]
            return items if keep else None
        raise GGUFError(f"unknown value type {vtype}")


# The counts _info reads. Their arrays are decoded (per-layer values of models whose layers
# differ), so that an odd value is seen and named; other arrays are skipped.
_KEEP_ARRAYS = ("context_length", "block_count", "embedding_length", "feed_forward_length",
                "head_count", "head_count_kv", "key_length", "value_length", "pooling_type",
                "file_type")


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
    except RecursionError:  # arrays of arrays of arrays...
        raise GGUFError("arrays nested too deeply") from None
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


def _count(value: object) -> int | None:
    """A whole number of 0 or more (a float one too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _number(kv: dict[str, object], key: str) -> int:
    """A count from the header; a per-layer array counts by its largest layer, which sizes
    the KV cache safely. A value of another kind makes the file unusable: GGUFError."""
    value = kv.get(key, 0)
    counts = [_count(v) for v in value] if isinstance(value, list) else [_count(value)]
    if None in counts:
        raise GGUFError(f"{key}: expected a whole number, got {value!r:.60}")
    return max(counts, default=0)


def _file_type(kv: dict[str, object]) -> str:
    if "general.file_type" not in kv:
        return ""
    from gguf import LlamaFileType

    ft = _number(kv, "general.file_type")
    try:
        name = LlamaFileType(ft).name
    except ValueError:
        return f"type{ft}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _info(kv: dict[str, object], params: int) -> GGUFInfo:
    arch = kv.get("general.architecture", "")
    if not isinstance(arch, str):
        raise GGUFError(f"general.architecture: expected a name, got {arch!r:.60}")

    def a(key: str) -> int:
        return _number(kv, f"{arch}.{key}")

    heads = a("attention.head_count")
    embd = a("embedding_length")
    head_dim = embd // heads if heads else 0
    return GGUFInfo(
        architecture=arch,
        name=str(kv.get("general.name", "")),
        basename=str(kv.get("general.basename", "")),
        size_label=str(kv.get("general.size_label", "")),
        file_type=_file_type(kv),
        param_count=params,
        context_length=a("context_length"),
        block_count=a("block_count"),
        embedding_length=embd,
        feed_forward_length=a("feed_forward_length"),
        head_count=heads,
        head_count_kv=a("attention.head_count_kv") or heads,
        key_length=a("attention.key_length") or head_dim,
        value_length=a("attention.value_length") or head_dim,
        is_projector=arch == "clip" or kv.get("general.type") == "mmproj",
        pooling_type=a("pooling_type"),
        sampling_sequence=str(kv.get("general.sampling.sequence", "")),
    )
