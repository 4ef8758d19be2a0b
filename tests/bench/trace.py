"""Issue 21's trace on real memory: five models of 1 GiB, room for three, 300 requests from
4 clients in a Zipf-like mix, against model-serve's stack and against the bare llama-server
router (its own LRU, `--models-max 3`) on the same arrival order.

The arrival order is one seeded sequence (weights 1/k over the five models, k = 1..5); four
client threads take the next request from it as each finishes its last (max_tokens 8, so every
request runs every layer and touches all of a model's mapped weights). Both runs measure memory
the same way, every 0.25 s: what the system counts as used plus the mapped weights of the
engine's model processes (shared/os_memory, as the governor counts them). The budget is that
figure before any model loads plus room for three and a half models (a model's file + 48 MiB),
and the stack's admission and governor get the same limit (MEMORY_PRESSURE_THRESHOLD);
everything else in the stack is at its defaults.

How to read the table:
  failed      requests not answered 200, then status/error code: count
  loads       model processes started (each load is a new llama-server child)
  LRU         misses of a 3-slot LRU cache replaying the arrival order (pure computation): the
              loads an ideal engine with room for three needs; x LRU = loads / LRU
  over        seconds over the budget in total, and the longest continuous stretch
  req/s       requests over the wall time of the run

Issue 21's "done when": 0 failed, loads at most 1.15x LRU, never over budget for more than 2 s.
A run of today's stack fails requests (503 insufficient_memory, "cannot leave now"), so it
loads fewer models than the LRU needs: its x LRU is low because the requests that would have
loaded a model were refused.

Time: 1 GiB f32 models on a 2-core machine serve about 0.3 requests/s (each token reads the
whole GiB), so the default run takes well over half an hour; --size-mib 256 runs both sides in
a few minutes and --max-tokens 2 halves it again. Memory is the machine's: other programs that
grow during the run (a test suite alongside) count against the budget.

    make bench                                      (after the other benchmarks)
    .venv/bin/python -m tests.bench.trace --size-mib 512   (smaller models: a quicker run)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from shared.llama_server import find_llama_server
from shared.os_memory import process_memory, system_memory
from shared.settings import load as load_settings
from tests.bench.governor import custom, model_id, table, write
from tests.harness import free_port, http, limit_threshold, make_stack

MIB = 1024**2
NAMES = ("alba", "bruno", "carla", "dario", "elena")
CLIENTS = 4
SLOTS = 3
SAMPLE = 0.25


def arrivals(n: int, seed: int) -> list[int]:
    """n model indices, Zipf-like (weight 1/k for the k-th model)."""
    rng = random.Random(seed)
    return rng.choices(range(len(NAMES)), [1 / k for k in range(1, len(NAMES) + 1)], k=n)


def lru_misses(order: list[int], slots: int) -> int:
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    misses = 0
    for m in order:
        if m in cache:
            cache.move_to_end(m)
            continue
        misses += 1
        cache[m] = None
        if len(cache) > slots:
            cache.popitem(last=False)
    return misses


def model_processes(root: int) -> list[psutil.Process]:
    """The llama-server processes under `root` that serve one model (`-m`/`--model`)."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for proc in children:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--model" in cmd or "-m" in cmd:
            out.append(proc)
    return out


def used_now(root: int) -> int:
    """What the system counts as used plus the model processes' mapped weights."""
    extra = 0
    for proc in model_processes(root):
        with contextlib.suppress(OSError, psutil.Error):
            extra += process_memory(proc.pid).reclaimable
    return system_memory().used + extra


class Sampler(threading.Thread):
    """Memory over the budget and the model processes started, sampled every SAMPLE s."""

    def __init__(self, root: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.root, self.limit = root, limit
        self.pids: set[tuple[int, float]] = set()  # (pid, start time): one per load
        self.over = self.longest = 0.0
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        stretch_from: float | None = None
        last = time.monotonic()
        while True:
            stop = self.done.is_set()
            self.pids |= {(p.pid, p.create_time()) for p in model_processes(self.root)}
            used = used_now(self.root)
            now = time.monotonic()
            self.peak = max(self.peak, used)
            if used > self.limit:
                stretch_from = last if stretch_from is None else stretch_from
                self.over += now - last
                self.longest = max(self.longest, now - stretch_from)
            else:
                stretch_from = None
            last = now
            if stop:
                return
            self.done.wait(SAMPLE)


@dataclass
class Result:
    label: str
    failed: collections.Counter[str]
    loads: int
    lru: int
    over: float
    longest: float
    peak_over: int
    seconds: float
    requests: int

    def row(self) -> tuple[str, ...]:
        fails = sum(self.failed.values())
        detail = ", ".join(f"{k}: {v}" for k, v in self.failed.most_common())
        return (self.label, f"{fails}" + (f" ({detail})" if detail else ""), str(self.loads),
                str(self.lru), f"{self.loads / self.lru:.2f}",
                f"{self.over:.1f} s / {self.longest:.1f} s",
                f"{self.peak_over / MIB:+,.0f} MiB", f"{self.requests / self.seconds:.2f}")


def drive(url: str, names: list[str], order: list[int], max_tokens: int
          ) -> tuple[collections.Counter[str], float]:
    """Four clients over the arrival order; the failures by status and error code."""
    failed: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    queue = iter(order)

    def client() -> None:
        while True:
            with lock:
                m = next(queue, None)
            if m is None:
                return
            body = {"model": names[m], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": "hi"}]}
            try:
                status, answer = http("POST", url + "/v1/chat/completions", body,
                                      timeout=600)
            except OSError as e:
                status, answer = 0, {"error": {"code": type(e).__name__}}
            if status != 200:
                error = answer.get("error") if isinstance(answer, dict) else None
                code = (error.get("code") or error.get("type")) if isinstance(error, dict) \
                    else None
                with lock:
                    failed[f"{status} {code}" if code else str(status)] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed, time.monotonic() - start


def measured(label: str, root: int, limit: int, url: str, names: list[str], order: list[int],
             max_tokens: int) -> Result:
    sampler = Sampler(root, limit)
    sampler.start()
    try:
        failed, seconds = drive(url, names, order, max_tokens)
    finally:
        sampler.done.set()
        sampler.join()
    return Result(label, failed, len(sampler.pids), lru_misses(order, SLOTS), sampler.over,
                  sampler.longest, sampler.peak - limit, seconds, len(order))


def stack_run(tmp: Path, root: Path, ids: list[str], room: int, order: list[int],
              max_tokens: int) -> Result:
    run = tmp / "stack"
    run.mkdir()
    config = custom(run, [f"  {m.removeprefix('ms/')}:\n    ctx_size: 512" for m in ids])
    stack = make_stack(run, root, config).start("engine", "proxy")
    try:
        system = http("GET", stack.url + "/running")[1]["system"]
        stack.env["MEMORY_PRESSURE_THRESHOLD"] = limit_threshold(system, room)
        stack.restart("proxy")  # its admission goes by the same limit
        stack.start("governor", wait=False)
        while http("GET", stack.url + "/running")[1]["system"]["governor"] != "up":
            time.sleep(0.1)
        engine = stack.procs[0].pid
        limit = used_now(engine) + room
        return measured("model-serve (router)", engine, limit, stack.url, ids, order,
                        max_tokens)
    finally:
        stack.stop()


def router_run(tmp: Path, paths: list[Path], room: int, order: list[int],
               max_tokens: int) -> Result:
    run = tmp / "router"
    run.mkdir()
    preset = run / "presets.ini"
    preset.write_text("".join(f"[{n}]\nmodel = {p}\nctx-size = 512\n\n"
                              for n, p in zip(NAMES, paths, strict=True)))
    port = free_port()
    binary = find_llama_server(load_settings())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    env["LLAMA_CACHE"] = str(run / "llama-cache")
    log = open(run / "router.log", "ab")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([binary, "--models-preset", str(preset), "--models-max",
                             str(SLOTS), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bare router did not start: "
                                   + (run / "router.log").read_text()[-2000:])
            time.sleep(0.1)
        limit = used_now(proc.pid) + room
        result = measured(f"bare router (--models-max {SLOTS})", proc.pid, limit, url,
                          list(NAMES), order, max_tokens)
        return result
    finally:
        started = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None \
            else []
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in started:  # a model server the router left behind
            try:
                child.wait(5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="each model's size")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--only", choices=("stack", "router"), help="run one side only")
    args = parser.parse_args()
    # a stopped benchmark still stops what it started (the finally clauses run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    order = arrivals(args.requests, args.seed)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root = tmp / "models"
        begun = time.monotonic()
        paths = [write(root, n, n_embd=1024, target_bytes=args.size_mib * MIB, seed=i)
                 for i, n in enumerate(NAMES)]
        ids = [model_id(p) for p in paths]
        one = max(p.stat().st_size for p in paths) + 48 * MIB
        room = int((SLOTS + 0.5) * one)
        mix = collections.Counter(order)
        print(f"{args.requests} requests from {CLIENTS} clients over {len(NAMES)} models of "
              f"{one / MIB:,.0f} MiB (written in {time.monotonic() - begun:.0f} s), budget "
              f"{room / MIB:,.0f} MiB above the baseline ({SLOTS + 0.5} models); mix "
              + " ".join(str(mix[i]) for i in range(len(NAMES))) + f", seed {args.seed}")
        results = []
        if args.only != "router":
            results.append(stack_run(tmp, root, ids, room, order, args.max_tokens))
        if args.only != "stack":
            results.append(router_run(tmp, paths, room, order, args.max_tokens))
        table([("engine", "failed", "loads", "LRU", "x LRU", "over budget (total / longest)",
                "peak vs budget", "req/s"), *(r.row() for r in results)])


if __name__ == "__main__":
    main()
