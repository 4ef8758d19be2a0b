"""Proxy overhead: the same requests sent to the engine directly and through the proxy,
interleaved in one run, on a tiny model so the serving path dominates.

    make bench
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

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


async def small(session, direct: str, proxy: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    payload = body(False, 1)
    for _ in range(SMALL_ROUNDS):
        for name, url in (("direct", direct), ("proxy", proxy)):
            times[name].append((await one(session, url, payload))[0])
    return times


async def streaming(session, direct: str, proxy: str, streams: int) -> dict[str, float]:
    payload = body(True, STREAM_TOKENS)
    rate: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(3):
        for name, url in (("direct", direct), ("proxy", proxy)):
            start = time.perf_counter()
            results = await asyncio.gather(*(one(session, url, payload) for _ in range(streams)))
            tokens = sum(c for _, c in results)
            rate[name].append(tokens / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in rate.items()}


async def run(stack) -> None:
    direct, proxy = stack.engine_url, stack.url
    connector = aiohttp.TCPConnector(limit=0)
    # the engine wants the stack's key; the proxy drops it (no API_KEY set here)
    async with aiohttp.ClientSession(connector=connector,
                                     headers=stack.engine_headers) as session:
        await one(session, proxy, body(False, 1))  # load the model (the engine never does)
        await small(session, direct, proxy)  # warm both paths
        times = await small(session, direct, proxy)
        rows = [("small requests", "p50 ms", "p99 ms")]
        for name in ("direct", "proxy"):
            rows.append((name, f"{pct(times[name], 50) * 1e3:.3f}",
                         f"{pct(times[name], 99) * 1e3:.3f}"))
        rows.append(("added by proxy",
                     f"{(pct(times['proxy'], 50) - pct(times['direct'], 50)) * 1e3:+.3f}",
                     f"{(pct(times['proxy'], 99) - pct(times['direct'], 99)) * 1e3:+.3f}"))
        print_table(rows)
        rows = [("streaming", "direct tok/s", "proxy tok/s", "proxy/direct")]
        for streams in (1, 32):
            r = await streaming(session, direct, proxy, streams)
            rows.append((f"{streams} stream{'s' if streams > 1 else ''}",
                         f"{r['direct']:.0f}", f"{r['proxy']:.0f}",
                         f"{r['proxy'] / r['direct'] * 100:.1f}%"))
        print_table(rows)


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
        write_model(tmp / "models" / "pub" / "bench" / "bench-F32.gguf", name="bench",
                    context_length=32768)
        (tmp / "config").mkdir()
        (tmp / "config" / "custom_models.yaml").write_text(
            "models:\n  bench:0.2m-f32:\n    parallel: 32\n    ctx_size: 16384\n"
            "    sampler_args: --threads 1 --threads-batch 1\n")
        stack = make_stack(tmp, tmp / "models", tmp / "config").start()
        try:
            print(f"proxy {stack.url} vs engine {stack.engine_url} (llama-server router), "
                  f"model {MODEL}, {SMALL_ROUNDS} interleaved rounds\n")
            asyncio.run(run(stack))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
