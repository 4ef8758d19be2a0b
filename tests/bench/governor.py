"""The governor with real llama-server processes that load as users load (mmap).

1. Estimates: the first estimate of three differently shaped generated models against the
   footprint llama-server really reaches (after a prompt that fills a whole batch, so the
   compute buffer is used), and the error.
2. Reaction: time from memory crossing the threshold to a model being gone. The machine's size
   is simulated here, so the crossing happens at an exact moment.
3. A scripted workload of mixed requests over four models of about 0.5 GiB, on the machine's
   real memory, with a limit set above the live baseline so that two and a half of them fit:
   unloads, peak model memory by the governor's accounting, and samples over the limit, with
   the governor and with TTL alone.

    make bench   (runs this after the proxy and sync benchmarks)
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path

from shared.catalog import Catalog, params_label
from shared.gguf_header import read_header
from shared.memory import first_estimate
from shared.tiny_gguf import write_model
from tests.harness import http, limit_threshold, make_stack

MIB = 1024**2
INTERVAL = 2.0
# name → (generator arguments, ctx_size, parallel)
SHAPES = {
    "wide": (dict(n_embd=1024, n_ff=4096, n_layer=8), 4096, 1),
    "deepkv": (dict(n_embd=512, n_head=8, n_layer=24, context_length=32768), 16384, 1),
    "gqavocab": (dict(n_embd=1024, n_head=16, n_head_kv=2, n_ff=2816, n_layer=8,
                      n_vocab=32000), 8192, 2),
}
WORKLOAD = ("anna", "boris", "clara", "dmitri")


def model_id(path: Path) -> str:
    return f"ms/{path.parent.name}:{params_label(read_header(path).param_count)}-f32"


def write(root: Path, name: str, **kwargs) -> Path:
    return write_model(root / "pub" / name / f"{name}-F32.gguf", name=name, **kwargs)


def custom(tmp: Path, lines: list[str]) -> Path:
    config = tmp / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "custom_models.yaml").write_text("\n".join(["models:", *lines]) + "\n")
    return config


def running(stack) -> dict:
    return http("GET", stack.url + "/running")[1]


def use(stack, model: str, prompt: str = "hi") -> int:
    return http("POST", stack.url + "/v1/chat/completions", {
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]},
        timeout=300)[0]


def estimates(tmp: Path) -> list[tuple[str, ...]]:
    root = tmp / "shapes"
    lines, ids = [], []
    for name, (kwargs, ctx, parallel) in SHAPES.items():
        path = write(root, name, **kwargs)
        ids.append(model_id(path))
        lines += [f"  {ids[-1].removeprefix('ms/')}:", f"    ctx_size: {ctx}",
                  f"    parallel: {parallel}"]
    run = tmp / "estimates"
    run.mkdir()
    stack = make_stack(run, root, custom(run, lines)).start("engine", "proxy")
    rows = [("model", "layers/embd/ff/kv heads/vocab", "ctx x slots", "estimate", "real",
             "error")]
    try:
        catalog = Catalog.from_json((run / "state/catalog.json").read_text())
        for mid, (name, (kwargs, ctx, parallel)) in zip(ids, SHAPES.items(), strict=True):
            assert use(stack, mid, "hi " * 300) == 200  # 900 tokens: a whole 512-token batch
            real = next(m["memory"]["measured"] for m in running(stack)["models"]
                        if m["id"] == mid)
            guess = first_estimate(catalog.entries[mid])
            info = catalog.entries[mid].info
            rows.append((name, f"{info['block_count']}/{info['embedding_length']}/"
                               f"{info['feed_forward_length']}/{info['head_count_kv']}/"
                               f"{kwargs.get('n_vocab', 259)}", f"{ctx} x {parallel}",
                         f"{guess / MIB:,.0f} MiB", f"{real / MIB:,.0f} MiB",
                         f"{100 * (guess - real) / real:+.1f}%"))
    finally:
        stack.stop()
    return rows


def set_machine(file: Path, total: int, base: int = 0) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"total": total, "base_used": base}))
    tmp.replace(file)


def reaction(tmp: Path) -> list[float]:
    root = tmp / "reaction-models"
    ids = [model_id(write(root, n, n_embd=256, target_bytes=100 * MIB, seed=i))
           for i, n in enumerate(("rea", "rex"))]
    machine = tmp / "machine.json"
    set_machine(machine, 10**15)
    run = tmp / "reaction"
    run.mkdir()
    stack = make_stack(run, root, custom(run, []), MIN_MODEL_AGE_SECONDS="0",
                       PRESSURE_CHECK_INTERVAL=str(INTERVAL),
                       MEMORY_SIMULATION_FILE=str(machine)).start("engine", "proxy", "governor")
    times = []
    try:
        for _ in range(3):
            for model in ids:
                assert use(stack, model) == 200, (run / "proxy.log").read_text()[-2000:]
            while not (len(rows := running(stack)["models"]) == 2
                       and all(m["memory"]["measured"] for m in rows)):
                time.sleep(0.05)
            used = sum(m["memory"]["measured"] for m in running(stack)["models"])
            start = time.monotonic()
            set_machine(machine, int(used / 0.80))  # 80% used: over the 75% threshold
            while len(running(stack)["models"]) == 2:
                time.sleep(0.01)
            times.append(time.monotonic() - start)
            set_machine(machine, 10**15)
    finally:
        stack.stop()
    return times


class Monitor(threading.Thread):
    """Samples /running: peak model memory (the loaded models' own memory, mapped weights
    included), samples whose accounted use is over the limit, and models that left."""

    def __init__(self, stack, limit: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.limit = stack, limit
        self.peak = self.over = self.samples = self.left = 0
        self.done = threading.Event()

    def run(self) -> None:
        before: set[str] = set()
        while not self.done.wait(0.05):
            body = running(self.stack)
            rows = [m for m in body["models"] if m["state"] == "loaded"]
            loaded = {m["id"] for m in rows}
            self.left += len(before - loaded)
            before = loaded
            self.peak = max(self.peak, sum(m["memory"]["measured"] or 0 for m in rows))
            self.samples += 1
            self.over += body["system"]["used"] > self.limit


def workload(tmp: Path) -> tuple[list[tuple[str, ...]], int, int]:
    root = tmp / "workload-models"
    ids = [model_id(write(root, n, n_embd=1024, n_layer=8, seed=i))
           for i, n in enumerate(WORKLOAD)]
    config = custom(tmp / "workload", [f"  {m.removeprefix('ms/')}:\n    ctx_size: 512"
                                       for m in ids])
    one = max(p.stat().st_size for p in root.rglob("*.gguf")) + 48 * MIB
    # TTL alone: the governor still loads and applies TTLs, but never sees pressure
    off = {"MEMORY_PRESSURE_THRESHOLD": "100", "PRESSURE_PSI_LEVEL": "100",
           "PRESSURE_PAGING_MIB_S": "1000000"}
    setups = (("governor (TTL 1800 s)", {}), ("TTL only, 1800 s", off),
              ("TTL only, 1 s", {**off, "MODEL_TTL": "1"}))
    rows = [("setup", "requests failed", "unloads", "peak model memory", "samples over")]
    for n, (label, env) in enumerate(setups):
        run = tmp / f"workload{n}"
        run.mkdir()
        stack = make_stack(run, root, config, MIN_MODEL_AGE_SECONDS="0",
                           PRESSURE_CHECK_INTERVAL="0.5", **env)
        stack.start("engine", "proxy")
        try:
            system = running(stack)["system"]
            limit = system["os_used"] + int(2.5 * one)
            stack.env.setdefault("MEMORY_PRESSURE_THRESHOLD",
                                 limit_threshold(system, int(2.5 * one)))
            stack.start("governor", wait=False)
            while running(stack)["system"]["governor"] != "up":
                time.sleep(0.1)
            monitor = Monitor(stack, limit)
            monitor.start()
            rng = random.Random(7)
            failed = 0
            for _ in range(40):
                failed += use(stack, rng.choices(ids, [5, 3, 2, 1])[0]) != 200
                time.sleep(0.25)
            time.sleep(1)
            monitor.done.set()
            monitor.join()
        finally:
            stack.stop()
        rows.append((label, str(failed), str(monitor.left), f"{monitor.peak / MIB:,.0f} MiB",
                     f"{monitor.over} of {monitor.samples}"))
    return rows, one, int(2.5 * one)


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print("first estimate against the real footprint (mmap, after a 900-token prompt)")
        table(estimates(tmp))
        times = reaction(tmp)
        print(f"threshold crossed → model gone (check interval {INTERVAL:.0f} s): "
              + ", ".join(f"{t:.2f}s" for t in times)
              + f"; worst {max(times) / INTERVAL:.2f} intervals (goal: within 2)\n")
        rows, one, room = workload(tmp)
        print(f"40 requests over 4 models ({one / MIB:,.0f} MiB each), real memory, limit "
              f"{room / MIB:,.0f} MiB above the baseline (2.5 models)")
        table(rows)


if __name__ == "__main__":
    main()
