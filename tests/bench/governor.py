"""The governor measured with real llama-server processes (models loaded without mmap) on a
simulated machine size, so the numbers mean the same on any host.

1. Reaction: time from memory crossing the threshold to a model being gone.
2. A scripted workload of mixed requests over four models of which only two fit under the
   limit: unloads made and peak memory, with the governor and with TTL alone.

    make bench   (runs this after the proxy and sync benchmarks)
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path

from shared.catalog import params_label
from shared.gguf_header import read_header
from shared.tiny_gguf import write_model
from tests.harness import free_port, http, make_stack

MIB = 1024**2
NAMES = ("anna", "boris", "clara", "dmitri")
INTERVAL = 2.0


def models(tmp: Path) -> list[str]:
    ids = []
    lines = ["models:"]
    for i, name in enumerate(NAMES):
        path = write_model(tmp / "models" / "pub" / name / f"{name}-F32.gguf", name=name,
                           n_embd=256, target_bytes=100 * MIB, seed=i)
        tag = f"{params_label(read_header(path).param_count)}-f32"
        ids.append(f"ms/{name}:{tag}")
        lines += [f"  {name}:{tag}:", "    ctx_size: 512", "    sampler_args: --load-mode none"]
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "custom_models.yaml").write_text("\n".join(lines) + "\n")
    return ids


def set_machine(file: Path, total: int, base: int = 0) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"total": total, "base_used": base}))
    tmp.replace(file)


def running(stack) -> list[dict]:
    return http("GET", stack.url + "/running")[1]["models"]


def use(stack, model: str) -> int:
    return http("POST", stack.url + "/v1/chat/completions", {
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})[0]


class Monitor(threading.Thread):
    """Samples loaded models: peak model memory and how many times a model left memory."""

    def __init__(self, stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.peak, self.unloads, self.done = stack, 0, 0, threading.Event()

    def run(self) -> None:
        before: set[str] = set()
        while not self.done.is_set():
            rows = running(self.stack)
            loaded = {m["id"] for m in rows if m["state"] == "loaded"}
            self.unloads += len(before - loaded)
            self.peak = max(self.peak, sum(m["memory"]["measured"] or 0 for m in rows
                                           if m["state"] == "loaded"))
            before = loaded
            time.sleep(0.05)


def stack_for(tmp: Path, name: str, **env):
    run = tmp / name
    run.mkdir()
    return make_stack(run, tmp / "models", tmp / "config", GOVERNOR_PORT=str(free_port()),
                      MIN_MODEL_AGE_SECONDS="0", PRESSURE_CHECK_INTERVAL=str(INTERVAL), **env)


def reaction(tmp: Path, ids: list[str], machine: Path) -> list[float]:
    set_machine(machine, 10**15)
    stack = stack_for(tmp, "reaction", MEMORY_SIMULATION_FILE=str(machine)).start(
        "engine", "proxy", "governor")
    times = []
    try:
        for _ in range(3):
            for model in ids[:2]:
                use(stack, model)
            while not all(m["memory"]["measured"] for m in running(stack)):
                time.sleep(0.05)
            used = sum(m["memory"]["measured"] for m in running(stack))
            start = time.monotonic()
            set_machine(machine, int(used / 0.80))  # 80% used: over the 75% threshold
            while len(running(stack)) == 2:
                time.sleep(0.01)
            times.append(time.monotonic() - start)
            set_machine(machine, 10**15)
    finally:
        stack.stop()
    return times


def workload(stack, ids: list[str], monitor: Monitor) -> int:
    rng = random.Random(7)
    weights = [5, 3, 2, 1]
    failures = 0
    monitor.start()
    for _ in range(40):
        failures += use(stack, rng.choices(ids, weights)[0]) != 200
        time.sleep(0.25)
    time.sleep(1)
    monitor.done.set()
    monitor.join()
    return failures


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ids = models(tmp)
        machine = tmp / "machine.json"
        times = reaction(tmp, ids, machine)
        print(f"threshold crossed → model gone (check interval {INTERVAL:.0f} s): "
              + ", ".join(f"{t:.2f}s" for t in times)
              + f"; worst {max(times) / INTERVAL:.2f} intervals (goal: within 2)\n")

        # size the machine so two models fit under 75% and three do not
        probe = stack_for(tmp, "probe").start("engine", "proxy")
        try:
            for model in ids:
                use(probe, model)
            while not all(m["memory"]["measured"] for m in running(probe)):
                time.sleep(0.05)
            one = max(m["memory"]["measured"] for m in running(probe))
        finally:
            probe.stop()
        limit = 2.5 * one
        set_machine(machine, int(limit / 0.75))

        rows = [("setup", "requests failed", "unloads", "peak model memory", "over the limit")]
        setups = (("governor (TTL 1800 s)", {"MEMORY_SIMULATION_FILE": str(machine)},
                   ("engine", "proxy", "governor")),
                  ("TTL only, 1800 s", {"MEMORY_ADMISSION": "off"}, ("engine", "proxy")),
                  ("TTL only, 1 s", {"MEMORY_ADMISSION": "off", "MODEL_TTL": "1"},
                   ("engine", "proxy")))
        for label, env, services in setups:
            stack = stack_for(tmp, label.split()[0] + str(len(rows)), **env).start(*services)
            try:
                monitor = Monitor(stack)
                failed = workload(stack, ids, monitor)
            finally:
                stack.stop()
            rows.append((label, str(failed), str(monitor.unloads),
                         f"{monitor.peak / MIB:,.0f} MiB",
                         "yes" if monitor.peak > limit else "no"))
        print(f"40 requests over 4 models ({one / MIB:,.0f} MiB each), limit "
              f"{limit / MIB:,.0f} MiB (75% of the simulated machine)")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for n, row in enumerate(rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if n == 0:
                print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
