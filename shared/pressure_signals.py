"""The operating system's own signs of memory pressure, besides the percentage used.

Linux: PSI (`/proc/pressure/memory`: share of time some task stalled waiting for memory) and
paging from /proc/vmstat (swap-ins, and refaults: pages evicted and read back, which is how
mapped weights thrash). Paging counts only while the kernel is reclaiming memory: some kernels
count refaults with no reclaim at all (seen on a test machine: 2 GiB of refaults, no page ever
scanned). macOS: the kernel's pressure level (`kern.memorystatus_vm_pressure_level`) and
swap-outs. Rates are taken between two samples, so the first sample never fires.
A signal this machine does not offer is listed in `missing` and left out.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared import os_memory

MIB = 1024**2
MAC_LEVELS = {"warn": 2, "critical": 4}  # kern.memorystatus_vm_pressure_level values
_PSI = re.compile(r"^some avg10=([\d.]+) avg60=[\d.]+ avg300=[\d.]+ total=(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Signal:
    name: str
    value: float
    level: float
    unit: str
    firing: bool
    detail: str = ""

    def describe(self) -> str:
        text = f"{self.name} {self.value:.1f}{self.unit} (level {self.level:g}{self.unit})"
        return f"{text}, {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return {"value": round(self.value, 2), "level": self.level, "unit": self.unit,
                "firing": self.firing}


def parse_psi(text: str) -> tuple[float, int]:
    """(some avg10 in percent, some total in microseconds)."""
    m = _PSI.search(text)
    if not m:
        raise ValueError("no 'some' line")
    return float(m.group(1)), int(m.group(2))


def parse_vmstat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _rate(now: int, before: int | None, seconds: float, scale: float) -> float:
    return 0.0 if before is None or seconds <= 0 else max(0, now - before) * scale / seconds


class LinuxSignals:
    def __init__(self, psi_level: float, paging_mib_s: float, proc: Path = Path("/proc")) -> None:
        self.psi_level, self.paging = psi_level, paging_mib_s
        self.proc = proc
        self.page = os.sysconf("SC_PAGE_SIZE") / MIB
        self.last: dict[str, int] = {}
        self.last_at: float | None = None
        self.missing: list[str] = []
        try:
            parse_psi((proc / "pressure/memory").read_text())
            self.has_psi = True
        except (OSError, ValueError) as e:
            self.has_psi = False
            self.missing.append(f"psi: {proc}/pressure/memory cannot be read ({e})")

    def sample(self) -> list[Signal]:
        now = time.monotonic()
        seconds = now - self.last_at if self.last_at is not None else 0.0
        signals = []
        counters = parse_vmstat((self.proc / "vmstat").read_text())
        refaults = counters.get("workingset_refault_anon", 0) + counters.get(
            "workingset_refault_file", counters.get("workingset_refault", 0))
        scanned = sum(v for k, v in counters.items()
                      if k.startswith(("pgscan_kswapd", "pgscan_direct")))
        current = {"swapin": counters.get("pswpin", 0), "refault": refaults, "scan": scanned}
        reclaiming = _rate(scanned, self.last.get("scan"), seconds, self.page)
        if self.has_psi:
            avg10, total = parse_psi((self.proc / "pressure/memory").read_text())
            current["psi_us"] = total
            # avg10 alone stays high for many seconds after the cause is gone; the share
            # over the last interval says whether the stall still goes on.
            recent = _rate(total, self.last.get("psi_us"), seconds, 100 / 1e6)
            firing = self.last_at is not None and min(avg10, recent) >= self.psi_level
            signals.append(Signal("psi", avg10, self.psi_level, "%", firing,
                                  f"{recent:.1f}% over the last {seconds:.1f}s"))
        for name, key in (("swap-in", "swapin"), ("refault", "refault")):
            rate = _rate(current[key], self.last.get(key), seconds, self.page)
            signals.append(Signal(name, rate, self.paging, " MiB/s",
                                  rate >= self.paging and reclaiming > 0,
                                  f"the kernel reclaiming {reclaiming:.1f} MiB/s"))
        self.last, self.last_at = current, now
        return signals


class MacSignals:
    def __init__(self, level: str, paging_mib_s: float, source=None) -> None:
        self.level, self.paging = MAC_LEVELS[level], paging_mib_s
        self.source = source
        self.last_swapouts: int | None = None
        self.last_at: float | None = None
        self.missing: list[str] = []
        try:
            self.source = source or os_memory.mac()
            self.source.sysctl_int("kern.memorystatus_vm_pressure_level")
        except (OSError, AttributeError) as e:
            self.missing.append(f"macos-pressure: kern.memorystatus_vm_pressure_level ({e})")

    def sample(self) -> list[Signal]:
        now = time.monotonic()
        seconds = now - self.last_at if self.last_at is not None else 0.0
        signals = []
        if not self.missing:
            level = self.source.sysctl_int("kern.memorystatus_vm_pressure_level")
            name = {1: "normal", 2: "warn", 4: "critical"}.get(level, str(level))
            signals.append(Signal("macos-pressure", level, self.level, "", level >= self.level,
                                  f"the kernel says {name}"))
        swapouts = self.source.vm_stats()["swapouts"]
        rate = _rate(swapouts, self.last_swapouts, seconds, self.source.page_size / MIB)
        signals.append(Signal("swap-out", rate, self.paging, " MiB/s", rate >= self.paging))
        self.last_swapouts, self.last_at = swapouts, now
        return signals


def for_this_machine(psi_level: float, paging_mib_s: float, mac_level: str):
    if os_memory.IS_MAC:
        return MacSignals(mac_level, paging_mib_s)
    return LinuxSignals(psi_level, paging_mib_s)
