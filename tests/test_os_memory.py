"""What the OS says about memory, read the way the governor reads it.

The Linux readers are tested on this machine's own /proc and on recorded files. The macOS
path cannot run on Linux: its arithmetic is tested on buffers packed with values shaped like
an M3 Max's (64 GiB, 16 KiB pages) during an mmap'd model's inference, as a public report
describes it (llama.cpp issue #8678: about 8 GiB "Memory Used" against 56 GiB "Cached
Files"); those values are not recorded on a Mac by this project.
"""

import os
import time
from pathlib import Path

import pytest

from shared import os_memory
from shared.os_memory import (
    ProcessMemory,
    SystemMemory,
    linux_process,
    mac_process,
    mac_system,
    mac_vm_stats,
)
from shared.pressure_signals import LinuxSignals, MacSignals, parse_psi, parse_vmstat

GIB, MIB = 1024**3, 1024**2

# /proc/PID/smaps_rollup of a llama-server child with a 1 GiB model mapped (recorded here)
ROLLUP = """55bfcd792000-7fff1c7fb000 ---p 00000000 00:00 0                          [rollup]
Rss:             1330248 kB
Pss:             1329112 kB
Pss_Dirty:       1317948 kB
Pss_Anon:         267164 kB
Pss_File:        1061948 kB
Pss_Shmem:             0 kB
Shared_Clean:       1580 kB
Private_Dirty:   1317948 kB
Anonymous:        267164 kB
Swap:                  0 kB
"""
STATUS = "Name:\tllama-server\nVmRSS:\t 1330248 kB\nRssAnon:\t  267164 kB\n" \
         "RssFile:\t 1063084 kB\nRssShmem:\t       0 kB\n"


def test_linux_process_counts_mapped_file_pages_as_reclaimable() -> None:
    assert linux_process(ROLLUP, STATUS) == ProcessMemory(1329112 * 1024, 1061948 * 1024)
    # without access to smaps_rollup (another user's process): /proc/PID/status
    assert linux_process(None, STATUS) == ProcessMemory(1330248 * 1024, 1063084 * 1024)


def test_this_machines_readings_are_sane() -> None:
    system = os_memory.system_memory()
    assert 0 < system.used < system.total
    me = os_memory.process_memory(os.getpid())
    assert 0 < me.reclaimable < me.total  # python's own mapped files and its heap


def test_a_mapped_file_is_reclaimable_to_the_system_but_counted_for_the_process(
        tmp_path) -> None:
    """What the governor exists for: 256 MiB of mapped file pages raise the process's
    reclaimable memory by that much and leave the system's used figure nearly alone."""
    import mmap
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(256 * MIB))
    before_sys, before = os_memory.system_memory(), os_memory.process_memory(os.getpid())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        sum(m[i] for i in range(0, len(m), 4096))  # touch every page
        after_sys, after = os_memory.system_memory(), os_memory.process_memory(os.getpid())
    assert after.reclaimable - before.reclaimable > 250 * MIB
    assert after_sys.used - before_sys.used < 128 * MIB


def test_psi_and_vmstat_parsers() -> None:
    text = ("some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\n"
            "full avg10=1.00 avg60=0.00 avg300=0.00 total=99\n")
    assert parse_psi(text) == (12.5, 123456)
    assert parse_vmstat("pswpin 10\nworkingset_refault_file 7\nnr_free 3\n") == {
        "pswpin": 10, "workingset_refault_file": 7, "nr_free": 3}
    with pytest.raises(ValueError):
        parse_psi("")


def fake_proc(root: Path, psi: tuple[float, int] | None, swapin: int, refault: int,
              scanned: int = 0) -> None:
    (root / "pressure").mkdir(parents=True, exist_ok=True)
    if psi is not None:
        (root / "pressure/memory").write_text(
            f"some avg10={psi[0]:.2f} avg60=0.00 avg300=0.00 total={psi[1]}\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    (root / "vmstat").write_text(f"pswpin {swapin}\nworkingset_refault_anon 0\n"
                                 f"workingset_refault_file {refault}\n"
                                 f"pgscan_kswapd {scanned}\npgscan_direct 0\n")


def firing(signals) -> set[str]:
    return {s.name for s in signals if s.firing}


def test_linux_signals_fire_on_a_stall_that_goes_on_and_on_paging(tmp_path) -> None:
    page_mib = os.sysconf("SC_PAGE_SIZE") / MIB
    fake_proc(tmp_path, (0.0, 0), 0, 0)
    signals = LinuxSignals(psi_level=10, paging_mib_s=32, proc=tmp_path)
    assert signals.missing == [] and firing(signals.sample()) == set()  # no rates yet
    time.sleep(0.2)
    # 40% of the last 0.2 s stalled, avg10 above the level: fires
    fake_proc(tmp_path, (25.0, 80_000), 0, 0)
    assert firing(signals.sample()) == {"psi"}
    time.sleep(0.2)
    # avg10 still high from before, but no new stall: the cause is gone, no firing
    fake_proc(tmp_path, (20.0, 80_000), 0, 0)
    assert firing(signals.sample()) == set()
    time.sleep(0.2)
    # 64 MiB refaulted and 64 MiB swapped in within ~0.2 s, far above 32 MiB/s, but the
    # kernel reclaims nothing: no pressure (some kernels count refaults without reclaim)
    pages = int(64 / page_mib)
    fake_proc(tmp_path, (0.0, 80_000), pages, pages)
    assert firing(signals.sample()) == set()
    time.sleep(0.2)
    # the same while the kernel scans pages to reclaim: thrashing
    fake_proc(tmp_path, (0.0, 80_000), 2 * pages, 2 * pages, scanned=pages)
    got = signals.sample()
    assert firing(got) == {"swap-in", "refault"}
    assert "MiB/s" in next(s for s in got if s.name == "refault").describe()


def test_a_missing_psi_is_said_once_and_the_other_signals_go_on(tmp_path) -> None:
    fake_proc(tmp_path, None, 0, 0)
    signals = LinuxSignals(psi_level=10, paging_mib_s=32, proc=tmp_path)
    assert len(signals.missing) == 1 and signals.missing[0].startswith("psi:")
    signals.sample()
    time.sleep(0.1)
    fake_proc(tmp_path, None, 10**6, 0, scanned=10**5)
    assert firing(signals.sample()) == {"swap-in"}


# ---- macOS, on values shaped like an M3 Max's (see the module docstring) -----------------

PAGE = 16384


def vm_buffer(**pages: int) -> bytes:
    fields = dict.fromkeys(os_memory._VM_FIELDS, 0) | pages
    return os_memory._VM_STATS64.pack(*(fields[f] for f in os_memory._VM_FIELDS))


def rusage_buffer(resident: int, footprint: int) -> bytes:
    values = dict.fromkeys(os_memory._RUSAGE_FIELDS, 0) | {
        "resident_size": resident, "phys_footprint": footprint}
    return os_memory._RUSAGE_V2.pack(b"\0" * 16, *(values[f] for f in os_memory._RUSAGE_FIELDS))


def test_mac_system_memory_leaves_out_cached_files_as_activity_monitor_does() -> None:
    # app memory 6 GiB (+1 GiB purgeable), wired 1.5 GiB, compressed 0.5 GiB: "Memory
    # Used" 8 GiB; 56 GiB of mapped weights sit in external pages ("Cached Files")
    raw = vm_buffer(internal=(7 * GIB) // PAGE, purgeable=GIB // PAGE,
                    wire=(3 * GIB // 2) // PAGE, compressor=(GIB // 2) // PAGE,
                    external=(56 * GIB) // PAGE, free=GIB // PAGE, swapouts=12345)
    assert os_memory._VM_STATS64.size == 152  # HOST_VM_INFO64_COUNT (38) × 4 bytes
    vm = mac_vm_stats(raw)
    assert vm["swapouts"] == 12345 and vm["external"] == (56 * GIB) // PAGE
    assert mac_system(vm, PAGE, 64 * GIB) == SystemMemory(64 * GIB, 8 * GIB)


def test_mac_process_adds_the_mapped_weights_beyond_the_footprint() -> None:
    assert os_memory._RUSAGE_V2.size == 16 + 18 * 8
    # llama-server with 40 GiB of weights mapped and resident, 2 GiB of KV cache and buffers
    mem = mac_process(rusage_buffer(resident=42 * GIB, footprint=2 * GIB))
    assert mem == ProcessMemory(42 * GIB, 40 * GIB)
    # weights wired into Metal buffers count in the footprint (and in "wired" system-wide):
    # nothing to add back
    assert mac_process(rusage_buffer(resident=42 * GIB, footprint=42 * GIB)) == \
        ProcessMemory(42 * GIB, 0)


class FakeMac:
    page_size = PAGE

    def __init__(self) -> None:
        self.level, self.swapouts = 1, 0

    def sysctl_int(self, name: str) -> int:
        assert name == "kern.memorystatus_vm_pressure_level"
        return self.level

    def vm_stats(self) -> dict[str, int]:
        return {"swapouts": self.swapouts}


def test_mac_signals_fire_on_the_kernels_warning_and_on_swap_growth() -> None:
    mac = FakeMac()
    signals = MacSignals("warn", 32, source=mac)
    assert signals.missing == [] and firing(signals.sample()) == set()
    mac.level = 2
    assert firing(signals.sample()) == {"macos-pressure"}
    assert MacSignals("critical", 32, source=mac).sample()[0].firing is False
    mac.level = 1
    time.sleep(0.1)
    mac.swapouts = (64 * MIB) // PAGE
    got = signals.sample()
    assert firing(got) == {"swap-out"} and "the kernel says normal" in got[0].describe()
