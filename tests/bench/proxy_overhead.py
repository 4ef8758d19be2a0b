"""Proxy overhead: the same requests to the model's own llama-server (bare), to the engine
(the router in front of it) and to the stack (the proxy), interleaved in one run, on a tiny
model so the serving path dominates; ratios over bare, and the proxy's own CPU.

    make bench
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from services.proxy.manage.events import Events
from services.proxy.manage.metrics import Metrics
from shared.engines.base import section_name
from shared.tiny_gguf import write_model
from tests.harness import make_stack

MODEL = "ms/bench:0.2m-f32"
SMALL_ROUNDS = 400
STREAM_TOKENS = 256


def body(stream: bool, max_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}).encode()


async def one(session: aiohttp.ClientSession, url: str, payload: bytes) -> tuple[float, int]:
    """Seconds for one request and the content chunks it returned."""
    start = time.perf_counter()
    chunks = 0
    async with session.post(url + "/v1/chat/completions", data=payload,
                            headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunks += 1
    return time.perf_counter() - start, chunks


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


class HopCPU:
    """One process's own CPU seconds spent while a block runs (its polls included)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.spent = 0.0

    def __enter__(self) -> HopCPU:
        times = self.proc.cpu_times()
        self._start = times.user + times.system
        return self

    def __exit__(self, *_) -> None:
        times = self.proc.cpu_times()
        self.spent += times.user + times.system - self._start


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent on anything but waiting."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def small(session, targets: dict[str, str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in targets}
    payload = body(False, 1)
    for _ in range(SMALL_ROUNDS):
        for name, url in targets.items():
            times[name].append((await one(session, url, payload))[0])
    return times


async def cpu_per_request(session, url: str, cpu: HopCPU) -> float:
    """In a run of its own: CPU time is counted in 10 ms ticks, too coarse for one request."""
    payload, cpu.spent = body(False, 1), 0.0
    with cpu:
        for _ in range(SMALL_ROUNDS):
            await one(session, url, payload)
    return cpu.spent / SMALL_ROUNDS


async def streaming(session, targets: dict[str, str], streams: int,
                    hops: dict[str, HopCPU]) -> tuple[dict[str, float], dict[str, int],
                                                     dict[str, float]]:
    """Per target: median tokens/s, the chunks it streamed, and the machine's busy cores."""
    payload = body(True, STREAM_TOKENS)
    rate: dict[str, list[float]] = {name: [] for name in targets}
    chunks = dict.fromkeys(targets, 0)
    busy = dict.fromkeys(targets, 0.0)
    for _ in range(3):
        for name, url in targets.items():
            start, busy_start = time.perf_counter(), busy_seconds()
            with hops.get(name) or contextlib.nullcontext():
                results = await asyncio.gather(*(one(session, url, payload)
                                                 for _ in range(streams)))
            elapsed = time.perf_counter() - start
            tokens = sum(c for _, c in results)
            chunks[name] += tokens
            busy[name] += (busy_seconds() - busy_start) / elapsed / 3
            rate[name].append(tokens / elapsed)
    return {k: statistics.median(v) for k, v in rate.items()}, chunks, busy


def latency_rows(times: dict[str, list[float]], base: str) -> list[tuple[str, ...]]:
    """p50 and p99 of each target's one-token requests, and what each adds over `base`'s."""
    ref = times[base]
    rows = [("one-token requests", "p50 ms", "p99 ms", f"p50 over {base}", f"p99 over {base}")]
    for name, t in times.items():
        rows.append((name, f"{pct(t, 50) * 1e3:.3f}", f"{pct(t, 99) * 1e3:.3f}",
                     f"{(pct(t, 50) - pct(ref, 50)) * 1e3:+.3f}",
                     f"{(pct(t, 99) - pct(ref, 99)) * 1e3:+.3f}"))
    return rows


async def stream_table(session, targets: dict[str, str], hops: dict[str, HopCPU],
                       base: str) -> dict[str, int]:
    """Prints tokens/s with 1 and 8 streams per target, over `base`'s, and the machine's busy
    cores; the hops' CPU counts from here. The chunks each target streamed."""
    rows = [("streaming", *(f"{n} tok/s" for n in targets),
             *(f"{n}/{base}" for n in targets if n != base),
             *(f"{n} cores busy" for n in targets))]
    for hop in hops.values():
        hop.spent = 0.0
    chunks = dict.fromkeys(targets, 0)
    for streams in (1, 8):
        r, streamed, busy = await streaming(session, targets, streams, hops)
        chunks = {n: chunks[n] + streamed[n] for n in targets}
        rows.append((f"{streams} stream{'s' if streams > 1 else ''}",
                     *(f"{r[n]:.0f}" for n in targets),
                     *(f"{r[n] / r[base]:.2f}" for n in targets if n != base),
                     *(f"{busy[n]:.2f}" for n in targets)))
    print_table(rows)
    return chunks


async def clients(session, url: str, n: int, seconds: float) -> float:
    """Requests per second from n clients, each sending one-token requests back to back."""
    payload, done = body(False, 1), 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one(session, url, payload)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n)))
    return done / (time.perf_counter() - start)


async def run(stack, targets: dict[str, str]) -> None:
    cpu = HopCPU(stack.procs[1].pid)
    hops = {"engine": HopCPU(router_pid(stack)), "stack": cpu}
    connector = aiohttp.TCPConnector(limit=0)
    # the engine and the model's server want the stack's key; the proxy drops it
    async with aiohttp.ClientSession(connector=connector,
                                     headers=stack.engine_headers) as session:
        await small(session, targets)  # warm every path
        times = await small(session, targets)
        per_request = {name: await cpu_per_request(session, targets[name], hop)
                       for name, hop in hops.items()}
        print_table(latency_rows(times, "bare"))
        chunks = await stream_table(session, targets, hops, "bare")
        print(f"own CPU per streamed chunk: router {hop_us(hops, chunks, 'engine')} us, "
              f"proxy {hop_us(hops, chunks, 'stack')} us (the machine has "
              f"{psutil.cpu_count()} cores)\n")
        rows = [("32 clients", "req/s", "/bare")]
        rates = {name: await clients(session, url, 32, 5.0) for name, url in targets.items()}
        for name, rate in rates.items():
            rows.append((name, f"{rate:.0f}", f"{rate / rates['bare']:.2f}"))
        print_table(rows)
        print(f"own CPU per one-token request: router {per_request['engine'] * 1e3:.3f} ms, "
              f"proxy {per_request['stack'] * 1e3:.3f} ms, of which the metrics' "
              f"bookkeeping {metrics_cost() * 1e3:.3f} ms\n")


def metrics_cost(rounds: int = 20000) -> float:
    """Seconds of CPU the metrics add to one request, in-process: what with_model, relay and
    the count middleware do for a warm one-token chat (the answer's end as llama-server
    writes it)."""
    metrics = Metrics(Events())
    end = (b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"usage":'
           b'{"completion_tokens":1,"prompt_tokens":9,"total_tokens":10},"timings":'
           b'{"prompt_n":9,"prompt_ms":1.2,"predicted_n":1,"predicted_ms":0.1,'
           b'"predicted_per_second":9000.0}}\n\ndata: [DONE]\n\n')
    start = time.process_time()
    for _ in range(rounds):
        turn = metrics.begin("/v1/chat/completions")
        turn.model, turn.backend = MODEL, "engine"
        in_flight = metrics.series(MODEL, "engine").in_flight
        in_flight.inc()
        turn.sent = turn.first_byte = time.monotonic()
        turn.ending(end)
        in_flight.dec()
        metrics.finish(turn, 200)
    return (time.process_time() - start) / rounds


def hop_us(hops: dict[str, HopCPU], chunks: dict[str, int], name: str) -> str:
    return f"{hops[name].spent / max(chunks[name], 1) * 1e6:.0f}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        stack = make_stack(tmp, *write_bench_model(tmp)).start()
        try:
            asyncio.run(load(stack))
            targets = {"bare": bare_url(stack), "engine": stack.engine_url,
                       "stack": stack.url}
            print(f"bare {targets['bare']} (the model's own llama-server), engine "
                  f"{stack.engine_url} (router), stack {stack.url} (proxy); model {MODEL}, "
                  f"{SMALL_ROUNDS} interleaved rounds\n")
            asyncio.run(run(stack, targets))
        finally:
            stack.stop()


def write_bench_model(root: Path) -> tuple[Path, Path]:
    """MODEL in root/models, held to one thread with 32 slots by root/config."""
    write_model(root / "models" / "pub" / "bench" / "bench-F32.gguf", name="bench",
                context_length=32768)
    (root / "config").mkdir(parents=True)
    (root / "config" / "custom_models.yaml").write_text(
        "models:\n  bench:0.2m-f32:\n    parallel: 32\n    ctx_size: 16384\n"
        "    sampler_args: --threads 1 --threads-batch 1\n")
    return root / "models", root / "config"


async def load(stack) -> None:
    async with aiohttp.ClientSession() as session:
        await one(session, stack.url, body(False, 1))  # the engine never loads by itself


def router_pid(stack) -> int:
    return next(p.pid for p in psutil.Process(stack.procs[0].pid).children()
                if "llama-server" in p.name())


def bare_url(stack) -> str:
    """The address of the model's own llama-server, a child of the router."""
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True)
                 if section_name(MODEL) in p.cmdline())
    args = child.cmdline()
    return f"http://127.0.0.1:{args[args.index('--port') + 1]}"


if __name__ == "__main__":
    main()
