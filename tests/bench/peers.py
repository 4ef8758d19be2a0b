"""One peer hop: two stacks on loopback, A with B as its peer (config/peers.yaml) and the tiny
model on B only; the same requests to B directly and to A for B's model, interleaved in one
run as in proxy_overhead; the ratios A/B, the milliseconds the hop adds, and A's own CPU.

    make bench
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import aiohttp
import psutil

from tests.bench.proxy_overhead import (
    MODEL,
    SMALL_ROUNDS,
    HopCPU,
    cpu_per_request,
    hop_us,
    latency_rows,
    load,
    pct,
    print_table,
    small,
    stream_table,
    write_bench_model,
)
from tests.harness import Stack, http, make_stack, wait

DIRECT, HOP = "B", "A"  # B directly; A for B's model, one peer hop


async def run(a: Stack, targets: dict[str, str]) -> None:
    cpu = HopCPU(a.procs[1].pid)  # A's proxy: the whole hop (A's engine has no model)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await small(session, targets)  # warm both paths
        times = await small(session, targets)
        per_request = await cpu_per_request(session, targets[HOP], cpu)
        print_table(latency_rows(times, DIRECT))
        b, hop = times[DIRECT], times[HOP]
        print(f"{HOP}/{DIRECT}: p50 x{pct(hop, 50) / pct(b, 50):.2f}, "
              f"p99 x{pct(hop, 99) / pct(b, 99):.2f}; the hop adds "
              f"{(pct(hop, 50) - pct(b, 50)) * 1e3:.3f} ms per request at p50\n")
        chunks = await stream_table(session, targets, {HOP: cpu}, DIRECT)
        print(f"A's own CPU: {per_request * 1e3:.3f} ms per one-token request, "
              f"{hop_us({HOP: cpu}, chunks, HOP)} us per streamed chunk (the machine has "
              f"{psutil.cpu_count()} cores)\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # B started before A's ports are picked: free ports are free only until taken
        b = make_stack(tmp / "b", *write_bench_model(tmp / "b")).start()
        stacks = [b]
        try:
            (tmp / "a" / "config").mkdir(parents=True)
            (tmp / "a" / "models").mkdir()
            (tmp / "a" / "config" / "peers.yaml").write_text(f"peers:\n  b:\n    url: {b.url}\n")
            a = make_stack(tmp / "a", tmp / "a" / "models", tmp / "a" / "config")
            stacks.insert(0, a)
            a.start()
            asyncio.run(load(b))
            wait(lambda: MODEL in {m["id"] for m in http("GET", a.url + "/v1/models")[1]
                                   ["data"]}, 30)  # A's first poll of B
            targets = {DIRECT: b.url, HOP: a.url}
            print(f"{DIRECT} {b.url} (the stack serving {MODEL}), {HOP} {a.url} (a stack "
                  f"with B as its peer and no model of its own, asked for B's); "
                  f"{SMALL_ROUNDS} interleaved rounds\n")
            asyncio.run(run(a, targets))
        finally:
            for stack in stacks:
                stack.stop()

if __name__ == "__main__":
    main()
