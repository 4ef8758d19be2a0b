"""How long from a pull or removal in Ollama until the proxy serves the change.

    make bench   (runs this after the proxy benchmark)
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.harness import http, make_stack, start_ollama

ROUNDS = 5


def ollama_call(url: str, method: str, path: str, body: dict) -> None:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        r.read()


def listed(stack) -> set[str]:
    return {m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def until(check) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > 30:
            raise TimeoutError
        time.sleep(0.01)
    return time.monotonic() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "config").mkdir()
        url, store, ollama = start_ollama(tmp)
        stack = make_stack(tmp, tmp / "models", tmp / "config", OLLAMA_BASE=url,
                           OLLAMA_MODELS=str(store)).start("engine", "proxy", "sync")
        appear, vanish = [], []
        try:
            for i in range(ROUNDS):
                model, sid = f"bench{i}:1b", f"ms/bench{i}:0.2m-f32"
                ollama_call(url, "POST", "/api/pull", {"model": model})
                appear.append(until(lambda sid=sid: sid in listed(stack)))
                ollama_call(url, "DELETE", "/api/delete", {"model": model})
                vanish.append(until(lambda sid=sid: sid not in listed(stack)))
        finally:
            stack.stop()
            ollama.terminate()
        print("Ollama change → proxy      median s  max s")
        print("------------------------  --------  -----")
        for label, values in (("pulled model requestable", appear),
                              ("removed model gone", vanish)):
            print(f"{label:24}  {statistics.median(values):8.2f}  {max(values):5.2f}")
        print(f"({ROUNDS} rounds; goal under 2 s; the original tool synced hourly)")


if __name__ == "__main__":
    main()
