"""What the operating system says about memory: the machine's used memory, and each model
process's own memory with the part of it the system's figure leaves out.

Model weights are memory-mapped by default. Linux counts mapped file pages as page cache,
which MemAvailable calls reclaimable; macOS shows them as "Cached Files". Either way the
system's used figure does not include them, so each process reports `reclaimable`: the part
of its memory the system's used figure leaves out, which the governor adds back.

Linux is read from /proc. macOS is read through ctypes (host_statistics64 and
proc_pid_rusage); that path cannot run on Linux, so its arithmetic is kept in pure
functions tested against values shaped like a Mac's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import struct
import sys
from dataclasses import dataclass

import psutil

IS_MAC = sys.platform == "darwin"


@dataclass(frozen=True)
class SystemMemory:
    total: int
    used: int  # what the system counts as in use: reclaimable cache excluded


@dataclass(frozen=True)
class ProcessMemory:
    total: int  # everything the process holds in memory
    reclaimable: int  # the part of `total` that SystemMemory.used leaves out


# ---- Linux -------------------------------------------------------------------------------

_KB = re.compile(r"^(\w+):\s+(\d+) kB", re.MULTILINE)


def _kb_fields(text: str) -> dict[str, int]:
    return {k: int(v) * 1024 for k, v in _KB.findall(text)}


def linux_process(smaps_rollup: str | None, status: str) -> ProcessMemory:
    """Proportional set sizes from smaps_rollup, so pages two model processes map from one
    file count once between them; without access to it (another user's process),
    /proc/PID/status, which anyone may read."""
    if smaps_rollup:
        f = _kb_fields(smaps_rollup)
        if "Pss_File" in f:
            return ProcessMemory(f["Pss"], f["Pss_File"])
    f = _kb_fields(status)
    return ProcessMemory(f.get("VmRSS", 0), f.get("RssFile", 0))


def _linux_process(pid: int) -> ProcessMemory:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            rollup: str | None = fh.read()
    except OSError:
        rollup = None
    with open(f"/proc/{pid}/status") as fh:
        return linux_process(rollup, fh.read())


# ---- macOS -------------------------------------------------------------------------------

# struct vm_statistics64 (mach/vm_statistics.h), the fields read here and their offsets.
_VM_STATS64 = struct.Struct("<4I9Q2I4Q4IQ")
_VM_FIELDS = ("free", "active", "inactive", "wire", "zero_fill", "reactivations", "pageins",
              "pageouts", "faults", "cow_faults", "lookups", "hits", "purges", "purgeable",
              "speculative", "decompressions", "compressions", "swapins", "swapouts",
              "compressor", "throttled", "external", "internal", "uncompressed_in_compressor")
# struct rusage_info_v2 (sys/resource.h): uuid[16], then uint64s; we read three of them.
_RUSAGE_V2 = struct.Struct("<16s18Q")
_RUSAGE_FIELDS = ("user_time", "system_time", "pkg_idle_wkups", "interrupt_wkups", "pageins",
                  "wired_size", "resident_size", "phys_footprint", "proc_start_abstime",
                  "proc_exit_abstime", "child_user_time", "child_system_time",
                  "child_pkg_idle_wkups", "child_interrupt_wkups", "child_pageins",
                  "child_elapsed_abstime", "diskio_bytesread", "diskio_byteswritten")


def mac_vm_stats(raw: bytes) -> dict[str, int]:
    """Page counts by field name from a vm_statistics64 buffer."""
    return dict(zip(_VM_FIELDS, _VM_STATS64.unpack_from(raw), strict=True))


def mac_system(vm: dict[str, int], page_size: int, total: int) -> SystemMemory:
    """Activity Monitor's "Memory Used": app memory (internal pages less purgeable ones),
    wired and compressed. "Cached Files" (external pages, mapped weights among them) are
    left out, as Linux leaves out page cache."""
    pages = vm["internal"] - vm["purgeable"] + vm["wire"] + vm["compressor"]
    return SystemMemory(total, pages * page_size)


def mac_process(raw: bytes) -> ProcessMemory:
    """The physical footprint (dirty and compressed memory and Metal's buffers, which the
    system's used figure includes) plus what is resident beyond it: clean pages of the
    mapped model file, which the system files under Cached Files."""
    ri = dict(zip(_RUSAGE_FIELDS, _RUSAGE_V2.unpack_from(raw)[1:], strict=True))
    footprint, resident = ri["phys_footprint"], ri["resident_size"]
    mapped = max(0, resident - footprint)
    return ProcessMemory(footprint + mapped, mapped)


class _Mac:
    """The ctypes calls behind the pure functions above; they need macOS."""

    HOST_VM_INFO64 = 4
    RUSAGE_INFO_V2 = 2

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # libSystem
        self.libc.mach_host_self.restype = ctypes.c_uint
        self.page_size = self.sysctl_int("hw.pagesize")

    def sysctl_int(self, name: str) -> int:
        value, size = ctypes.c_int64(0), ctypes.c_size_t(8)
        if self.libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size),
                                  None, ctypes.c_size_t(0)) != 0:
            raise OSError(ctypes.get_errno(), f"sysctl {name}")
        return value.value if size.value == 8 else ctypes.c_int32(value.value).value

    def vm_stats(self) -> dict[str, int]:
        buf = ctypes.create_string_buffer(_VM_STATS64.size)
        count = ctypes.c_uint(_VM_STATS64.size // 4)
        if self.libc.host_statistics64(self.libc.mach_host_self(), self.HOST_VM_INFO64, buf,
                                       ctypes.byref(count)) != 0:
            raise OSError("host_statistics64 failed")
        return mac_vm_stats(buf.raw)

    def process(self, pid: int) -> ProcessMemory:
        buf = ctypes.create_string_buffer(_RUSAGE_V2.size)
        if self.libc.proc_pid_rusage(pid, self.RUSAGE_INFO_V2, buf) != 0:
            raise psutil.AccessDenied(pid)
        return mac_process(buf.raw)


_mac: _Mac | None = None


def mac() -> _Mac:
    global _mac
    if _mac is None:
        _mac = _Mac()
    return _mac


# ---- what the rest of the code calls ------------------------------------------------------

def system_memory() -> SystemMemory:
    vm = psutil.virtual_memory()
    if IS_MAC:
        return mac_system(mac().vm_stats(), mac().page_size, vm.total)
    return SystemMemory(vm.total, vm.total - vm.available)


def process_memory(pid: int) -> ProcessMemory:
    """Raises OSError or psutil.Error when the process is gone or cannot be read."""
    return mac().process(pid) if IS_MAC else _linux_process(pid)


def memory_by_port(ports: dict[str, int]) -> dict[str, ProcessMemory]:
    """The memory of the server process listening on each model's port, found by the
    `--port N` in its command line (which needs no privileges on macOS either)."""
    wanted = {str(port): key for key, port in ports.items()}
    out: dict[str, ProcessMemory] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        for flag, value in zip(cmd, cmd[1:], strict=False):
            # a process gone meanwhile, or not ours to read, is left out
            if flag == "--port" and value in wanted:
                with contextlib.suppress(OSError, psutil.Error):
                    out[wanted[value]] = process_memory(proc.pid)
    return out


def _model_file(cmdline: list[str]) -> str | None:
    """The model file a runner's command line names (`--model <file>` or `-m <file>`)."""
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag in ("--model", "-m"):
            return os.path.realpath(value)
    return None


def _is_ollama_server(info: dict) -> bool:
    cmd = info.get("cmdline") or []
    return "ollama" in (info.get("name") or "").lower() and cmd[1:2] == ["serve"]


def memory_of_ollama_runners(files: dict[str, str]) -> dict[str, ProcessMemory]:
    """The memory of the runner serving each (real) file: a process under `ollama serve`
    (0.33 runs each model as a llama-server child of it, older versions as `ollama runner`)
    whose command line names the file. Only Ollama's own processes count: the engine's
    llama-server may serve the same blob. A process we may not inspect is skipped."""
    wanted = {path: key for key, path in files.items()}
    out: dict[str, ProcessMemory] = {}
    for server in psutil.process_iter(["name", "cmdline"]):
        if not _is_ollama_server(server.info):
            continue
        with contextlib.suppress(OSError, psutil.Error):
            for runner in server.children(recursive=True):
                with contextlib.suppress(OSError, psutil.Error):
                    if (path := _model_file(runner.cmdline())) in wanted:
                        out[wanted[path]] = process_memory(runner.pid)
    return out
