"""One model file Ollama has under two tags (`ollama cp`), as a client sees it through the
stack, with the real Ollama running and after it stopped: each tag a row of /api/tags (as
Ollama lists them), in `ollama list` and `model names`, one /v1/models row with the other
tag among its aliases, and each tag answering a chat (skipped where there is no real Ollama)."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import http, wait
from tests.real_ollama import RealOllama
from tests.streams import chat

LATEST, SIZED = "tinytag:latest", "tinytag:1.1b"  # one blob
TAGS = {LATEST, SIZED}


@pytest.fixture(scope="module")
def made(real_ollama: RealOllama) -> RealOllama:
    real_ollama.create(LATEST, seed=3)
    copied = real_ollama.cli("cp", LATEST, SIZED)
    assert copied.returncode == 0, copied.stderr
    return real_ollama


def tag_rows(stack) -> list[dict]:
    return [m for m in http("GET", stack.url + "/api/tags")[1]["models"] if m["name"] in TAGS]


def go_list(real: RealOllama, stack) -> set[str]:
    """The names Ollama's own `ollama list` shows, pointed at the stack."""
    env = {**real.env, "OLLAMA_HOST": stack.url.removeprefix("http://")}
    listed = subprocess.run([str(real.exe), "list"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    return {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()}


def assert_every_tag_is_seen(stack, real: RealOllama) -> None:
    rows = tag_rows(stack)
    assert sorted(m["name"] for m in rows) == sorted(TAGS), rows  # each once
    same = [{k: v for k, v in m.items() if k not in ("name", "model", "modified_at")}
            for m in rows]
    assert same[0] == same[1]  # one file: the same digest, size and details
    assert go_list(real, stack) >= TAGS
    served = [m for m in http("GET", stack.url + "/v1/models")[1]["data"]
              if TAGS & {m["id"], *m["aliases"]}]
    assert len(served) == 1 and set(served[0]["aliases"]) >= TAGS, served
    named = stack.cli("names")
    line = next(x for x in named.stdout.splitlines() if served[0]["id"] in x)
    assert line.startswith(f"{SIZED}, {LATEST} "), named.stdout  # the OLLAMA NAME column
    for name in TAGS:
        status, body = http("POST", stack.url + "/v1/chat/completions",
                            chat(name, max_tokens=2))
        assert status == 200 and body["model"] == name, body
        status, body = http("POST", stack.url + "/api/chat", {
            "model": name, "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": {"num_predict": 2}})
        assert status == 200 and body["model"] == name and body["done"], body


def test_each_tag_of_a_file_is_listed_with_ollama_up_and_after_it_stops(
        stack_factory, made) -> None:
    stack = stack_factory(OLLAMA_BASE=made.url, OLLAMA_MODELS=str(made.store)).start(
        "engine", "proxy", "sync")
    wait(lambda: any(set(m["aliases"]) >= TAGS for m in http(
        "GET", stack.url + "/v1/models")[1]["data"]), 30)
    theirs = {m["name"]: m for m in http("GET", made.url + "/api/tags")[1]["models"]}
    assert {m["name"]: m for m in tag_rows(stack)} == theirs  # Ollama's own rows
    assert_every_tag_is_seen(stack, made)

    made.stop()  # the sync has linked the file: the engine still serves both tags
    # the rows are the engine's own now (they carry capabilities too, as Ollama's do)
    wait(lambda: {m["name"]: m for m in tag_rows(stack)} != theirs, 30)
    assert_every_tag_is_seen(stack, made)
