"""Three busy models whose memory grows, on real memory: do they stay within the budget?

Three models with an 8,192-token context each are loaded under a limit that holds just their
three estimates (what admission counts them at) above the live baseline. Then three clients,
one per model, hold conversations that grow by about a thousand tokens a turn until they fill
the context, switching between two conversations per model, so that each llama-server's KV
cache fills and its prompt cache (--cache-ram) takes the conversation set aside. Memory is
sampled as in the trace (tests/bench/trace.py): what the system counts as used plus the
mapped weights of the model processes. The stack's admission and governor get the limit.

    .venv/bin/python -m tests.bench.growth            (about five minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from shared.catalog import Catalog
from shared.memory import first_estimate
from tests.bench.governor import custom, model_id, table, write
from tests.bench.trace import Sampler, used_now
from tests.harness import http, limit_threshold, make_stack

MIB = 1024**2
NAMES = ("grow-a", "grow-b", "grow-c")
CTX = 8192
NOISE = 32 * MIB  # what the baseline moves by on its own (the stack's processes, the OS)
TURN = " ".join(f"item {i} of the list;" for i in range(35))  # about a thousand tokens


def converse(url: str, model: str, turns: int, failed: list[str]) -> None:
    """Two conversations, a turn of each in turn, each growing until it nearly fills the
    context; then they start again."""
    talks: list[list[dict]] = [[], []]
    for n in range(turns):
        talk = talks[n % 2]
        if len(talk) >= 10:  # ~5,500 tokens: the next turns would not fit
            talk.clear()
        talk.append({"role": "user", "content": f"{n}: {TURN}"})
        status, answer = http("POST", url + "/v1/chat/completions", {
            "model": model, "messages": talk, "max_tokens": 4, "temperature": 0},
            timeout=600)
        if status != 200:
            failed.append(f"{model}: {status} {answer}")
            return
        talk.append(answer["choices"][0]["message"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128, help="each model's file")
    parser.add_argument("--turns", type=int, default=16, help="turns per model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root = tmp / "models"
        paths = [write(root, n, n_embd=512, n_head=8, n_layer=8, context_length=CTX,
                       target_bytes=args.size_mib
                       * MIB, seed=i) for i, n in enumerate(NAMES)]
        ids = [model_id(p) for p in paths]
        config = custom(tmp, [f"  {m.removeprefix('ms/')}:\n    ctx_size: {CTX}" for m in ids])
        stack = make_stack(tmp, root, config, MIN_MODEL_AGE_SECONDS="0")
        stack.start("engine", "proxy", "governor")
        try:
            catalog = Catalog.from_json((stack.state_dir / "catalog.json").read_text())
            need = sum(first_estimate(catalog.entries[m]) for m in ids)
            # the baseline with every process of the stack running, and a little for noise
            system = http("GET", stack.url + "/running")[1]["system"]
            stack.env["MEMORY_PRESSURE_THRESHOLD"] = limit_threshold(system, need + NOISE)
            stack.restart("proxy")
            stack.restart("governor")
            engine = stack.procs[0].pid
            limit = used_now(engine) + need + NOISE
            for m in ids:
                assert http("POST", stack.url + "/models/load", {"model": m})[0] == 200
            loaded = [r["id"] for r in http("GET", stack.url + "/running")[1]["models"]]
            sampler = Sampler(engine, limit)
            sampler.start()
            failed: list[str] = []
            clients = [threading.Thread(target=converse, args=(stack.url, m, args.turns,
                                                               failed)) for m in ids]
            began = time.monotonic()
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            seconds = time.monotonic() - began
            sampler.done.set()
            sampler.join()
            rows = http("GET", stack.url + "/running")[1]["models"]
            unloads = [e for e in http("GET", stack.url + "/events")[1]["events"]
                       if e["kind"] == "unloaded"]
        finally:
            stack.stop()
    print(f"three models of {args.size_mib} MiB, context {CTX}, estimates {need / MIB:,.0f} "
          f"MiB in all: the budget above the baseline; loaded together: {len(loaded)}")
    grown = sum(r["memory"]["measured"] or 0 for r in rows)
    table([("turns", "failed", "unloads", "models at the end", "peak vs budget",
            "over budget (total / longest)", "seconds"),
           (str(3 * args.turns), str(len(failed)), str(len(unloads)),
            f"{grown / MIB:,.0f} MiB ({100 * grown / need:.0f} % of the estimates)",
            f"{(sampler.peak - limit) / MIB:+,.0f} MiB ({100 * (sampler.peak - limit) / need:+.1f}"
            " % of the budget)", f"{sampler.over:.1f} s / {sampler.longest:.1f} s",
            f"{seconds:.0f}")])
    for f in failed:
        print("failed:", f)


if __name__ == "__main__":
    main()
