"""Memory: what a model will need, what a loaded one uses, and what the machine has left."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from shared.catalog import Entry
from shared.files import write_atomic

MIB = 1024**2
# Compute buffers and runtime on top of weights and KV cache; a learned footprint replaces it.
ALLOWANCE_BYTES = 64 * MIB
ALLOWANCE_SHARE = 0.05
KV_ELEMENT_BYTES = 2  # f16 K and V


def kv_cache_bytes(entry: Entry) -> int:
    info = entry.info
    per_token = info.get("head_count_kv", 0) * (info.get("key_length", 0)
                                                + info.get("value_length", 0))
    return (info.get("block_count", 0) * entry.ctx_size * per_token * KV_ELEMENT_BYTES
            * entry.parallel)


def first_estimate(entry: Entry) -> int:
    return int(entry.size_bytes * (1 + ALLOWANCE_SHARE) + kv_cache_bytes(entry)
               + ALLOWANCE_BYTES)


class Footprints:
    """What loads of each model really used, kept in STATE_DIR for the next estimate. A
    footprint counts only while the file, context and slots it was measured with still hold."""

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            self.data: dict[str, dict] = json.loads(file.read_text())
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _shape(entry: Entry) -> list:
        return [entry.path, entry.ctx_size, entry.parallel]

    def learned(self, entry: Entry) -> int | None:
        rec = self.data.get(entry.id)
        return rec["bytes"] if rec and rec.get("shape") == self._shape(entry) else None

    def learn(self, entry: Entry, measured: int) -> bool:
        """Keep the largest measurement for this shape; True when it changed."""
        old = self.learned(entry)
        if old is not None and measured <= old:
            return False
        self.data[entry.id] = {"bytes": measured, "shape": self._shape(entry)}
        return True

    def save(self) -> None:
        write_atomic(self.file, json.dumps(self.data, indent=1))

    def estimate(self, entry: Entry) -> int:
        return self.learned(entry) or first_estimate(entry)


@dataclass(frozen=True)
class Reading:
    total: int
    available: int

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def used_pct(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0


def system_reading() -> Reading:
    """psutil's `available` counts what the system can reclaim (on macOS free + inactive
    pages, on Linux MemAvailable), so file cache does not look like pressure."""
    vm = psutil.virtual_memory()
    return Reading(vm.total, vm.available)


def simulated_reading(file: Path, model_bytes: int) -> Reading:
    """A machine of `total` bytes where everything but the models uses `base_used`: the
    models' own memory is measured for real. For tests and benchmarks, so thresholds are
    deterministic on any machine."""
    data = json.loads(file.read_text())
    total = int(data["total"])
    return Reading(total, max(0, total - int(data["base_used"]) - model_bytes))


def rss_by_port(ports: dict[str, int]) -> dict[str, int]:
    """Resident memory of the server process listening on each model's port (found by the
    `--port N` in its command line, which needs no privileges on macOS either)."""
    wanted = {str(port): mid for mid, port in ports.items()}
    out: dict[str, int] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = proc.info.get("cmdline") or []
        for flag, value in zip(cmd, cmd[1:], strict=False):
            if flag == "--port" and value in wanted and proc.info.get("memory_info"):
                out[wanted[value]] = proc.info["memory_info"].rss
    return out
