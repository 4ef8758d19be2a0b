"""Memory: what a model will need, what loads of it really used, and the governor's
accounting of what the machine has left."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.files import write_if_possible
from shared.os_memory import SystemMemory
from shared.settings import LLAMA_CACHE_RAM_MIB

if TYPE_CHECKING:  # the catalog sizes its entries' prompt caches from here
    from shared.catalog import Entry
    from shared.model_flags import Option

MIB = 1024**2
KV_ELEMENT_BYTES = 2  # f16 K and V
UBATCH = 512  # llama-server's default physical batch, which sizes its compute buffer
RUNTIME_BYTES = 32 * MIB  # llama-server's own code, threads and heap
# A model that is not a GGUF the catalog read (one of Ollama's own): its file plus this.
UNKNOWN_SHARE = 0.25
CACHE_RAM_FLAGS = ("--cache-ram", "-cram")


def kv_cache_bytes(entry: Entry) -> int:
    """llama-server's `-c` is the whole cache, shared by the slots (not per slot)."""
    info = entry.info
    per_token = info.get("head_count_kv", 0) * (info.get("key_length", 0)
                                                + info.get("value_length", 0))
    return info.get("block_count", 0) * entry.ctx_size * per_token * KV_ELEMENT_BYTES


def compute_buffer_bytes(entry: Entry) -> int:
    """llama-server's CPU compute buffer with flash attention (its default where the backend
    has it): the feed-forward activations of one batch, and the f16 attention mask over the
    whole context. Fitted to the sizes llama-server logs for generated models of several
    shapes (`-lv 4`: "compute buffer size")."""
    info = entry.info
    width = 4 * info.get("feed_forward_length", 0) + 2 * info.get("embedding_length", 0)
    return UBATCH * 4 * width + UBATCH * entry.ctx_size * 2


def cache_ram_option(entry: Entry) -> Option | None:
    """The --cache-ram llama-server goes by: the last one given."""
    return next((o for o in reversed(entry.options) if o[0] in CACHE_RAM_FLAGS), None)


def cache_ram_mib(entry: Entry, most: int) -> int:
    """The --cache-ram to give the entry: room for two of its full contexts, at most `most`
    (CACHE_RAM_MIB). At least 1 MiB, as 0 would turn the cache off; `most` alone for a model
    whose shape is unknown."""
    kv = kv_cache_bytes(entry)
    return min(most, max(1, -(-2 * kv // MIB))) if kv else most


def prompt_cache_bytes(entry: Entry) -> int:
    """What the entry's --cache-ram lets its llama-server keep of prompts beyond what it took
    at load; none without the flag (Ollama's models, a catalog from before it was given)."""
    option = cache_ram_option(entry)
    try:
        mib = int(option[1]) if option else 0
    except (IndexError, ValueError):
        return 0  # llama-server refuses to start with it
    # -1, no limit: it grows past this, but this much it may surely take
    return (LLAMA_CACHE_RAM_MIB if mib < 0 else mib) * MIB


def full_size(entry: Entry) -> int | None:
    """What a llama-server of the entry holds once its whole context is in use: its weights,
    KV cache, compute buffer and runtime. None for a file the catalog could not read."""
    if not entry.info:
        return None
    return entry.size_bytes + kv_cache_bytes(entry) + compute_buffer_bytes(entry) \
        + RUNTIME_BYTES


def first_estimate(entry: Entry) -> int:
    base = full_size(entry)
    if base is None:
        base = int(entry.size_bytes * (1 + UNKNOWN_SHARE) + RUNTIME_BYTES)
    return base + prompt_cache_bytes(entry)


RPC_NOTE = ("rpc: the part on this machine is known after its first load; until then the "
            "whole model is counted")
RPC_MEASURED = "rpc: only the part on this machine (the workers hold the rest)"


def shape(entry: Entry, backend: str) -> list:
    """What a learned footprint depends on: the backend, the file, the context, the slots,
    and the RPC workers that hold part of it."""
    base = [backend, entry.path, entry.ctx_size, entry.parallel]
    return [*base, sorted(entry.rpc)] if entry.rpc else base


class Footprints:
    """What each model took at its last load, kept in STATE_DIR for the next estimate. A
    footprint counts only while the shape it was measured with still holds. Measured at
    load, not at its largest: what a model grows by after it (its prompt cache) is bounded
    by --cache-ram and counted apart, and one busy afternoon does not price it out for good.
    A load's reading cannot see the KV pages its first long conversation touches, so it
    raises the estimate of a model whose shape is known, never lowers it below that shape."""

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            self.data: dict[str, dict] = json.loads(file.read_text())
        except (OSError, ValueError):
            self.data = {}
        if not isinstance(self.data, dict):
            self.data = {}

    def learned(self, key: str, shape: list) -> int | None:
        rec = self.data.get(key)
        ok = isinstance(rec, dict) and rec.get("shape") == shape
        return rec["bytes"] if ok else None

    def learn(self, key: str, shape: list, measured: int) -> bool:
        """`measured`: the model's memory right after a load, which replaces what was kept;
        True when that changed."""
        if self.learned(key, shape) == measured:
            return False
        self.data[key] = {"bytes": measured, "shape": shape}
        return True

    def save(self) -> None:
        write_if_possible(self.file, json.dumps(self.data, indent=1))

    def estimate(self, key: str, entry: Entry, backend: str) -> int:
        """What the model may take: at load, learned or from its shape, with its whole context
        in use, and its prompt cache's room."""
        learned = self.learned(key, shape(entry, backend))
        if not learned:
            return first_estimate(entry)
        if entry.rpc:
            # its workers hold most of the weights: what its shape says this machine needs
            # cannot be told apart from theirs, so what its load took here counts
            return learned + prompt_cache_bytes(entry)
        return max(learned, full_size(entry) or 0) + prompt_cache_bytes(entry)

    def memory_note(self, key: str, entry: Entry, backend: str) -> str | None:
        """What a model's memory row counts, where it is not simply its process here."""
        if not entry.rpc:
            return None
        return RPC_MEASURED if self.learned(key, shape(entry, backend)) else RPC_NOTE


@dataclass(frozen=True)
class Accounting:
    """Used memory for every decision: what the system counts as used, plus the models'
    memory it leaves out (mapped weights), plus memory reserved for loads in progress. For
    admission, also what the loaded models may still grow by up to their estimates, so that
    a load admitted now still fits once the others' conversations fill their caches."""

    total: int
    os_used: int
    models_reclaimable: int
    reserved: int
    threshold_pct: float
    growth: int = 0

    @property
    def used(self) -> int:
        return min(self.total, self.os_used + self.models_reclaimable + self.reserved
                   + self.growth)

    @property
    def used_pct(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0

    @property
    def limit(self) -> int:
        return int(self.total * self.threshold_pct / 100)

    @property
    def room(self) -> int:
        """What can still be loaded under the limit (negative: over it)."""
        return self.limit - self.used

    def to_dict(self) -> dict:
        return {"total": self.total, "used": self.used, "available": self.total - self.used,
                "used_pct": round(self.used_pct, 1), "threshold_pct": self.threshold_pct,
                "limit": self.limit, "os_used": self.os_used,
                "models_reclaimable": self.models_reclaimable, "reserved": self.reserved}


def account(system: SystemMemory, rows: list[dict], reserved: int,
            threshold_pct: float, growth: int = 0) -> Accounting:
    """`rows` are /running's models; each page is counted once: the system's figure holds
    what it counts, each row adds only its `reclaimable` part."""
    reclaimable = sum(r["memory"]["reclaimable"] or 0 for r in rows)
    return Accounting(system.total, system.used, reclaimable, reserved, threshold_pct, growth)


def simulated_system(file: Path, rows: list[dict]) -> SystemMemory:
    """A machine of `total` bytes where everything but the models uses `base_used`; the
    models' own memory is measured for real. For tests of decision logic only."""
    data = json.loads(file.read_text())
    counted = sum((r["memory"]["measured"] or 0) - (r["memory"]["reclaimable"] or 0)
                  for r in rows)
    return SystemMemory(int(data["total"]), int(data["base_used"]) + counted)
