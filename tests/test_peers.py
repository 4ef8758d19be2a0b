"""Peers (issue 24): two real stacks on loopback, A with B as its peer, a bare
llama-server as a peer of kind `openai`, the real llama-swap and Ollama as peers of theirs.
A lists B's models, answers for them through B (with B's key, never its own), says which
peer is down within 10 s while its own models answer, and serves them again once B is back,
without a restart; a model that cannot start here goes to a peer with room for it."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import ollama
import openai
import pytest
import yaml

from services.cli import stack as stack_cmds
from shared.llama_server import find_llama_server
from shared.peers import HOP, load_peers
from shared.settings import load
from shared.tiny_gguf import write_model
from tests.browser import Chromium
from tests.harness import Stack, free_port, free_ports, http, make_stack, wait
from tests.real_engines import llama_swap

ALPHA, BETA, BOTH = "ms/alpha:0.2m-f32", "ms/beta:0.2m-f32", "ms/both:0.2m-f32"
A_KEY, B_KEY = {"Authorization": "Bearer a-key"}, {"Authorization": "Bearer b-key"}


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **extra}


def _stack(tmp: Path, models: tuple[str, ...], peers: str = "", **env: str) -> Stack:
    root = tmp / "models"
    for seed, name in enumerate(models):
        write_model(root / "pub" / f"{name}-GGUF" / f"{name}-F32.gguf", name=name, seed=seed)
    config = tmp / "config"
    config.mkdir(parents=True)
    if peers:
        (config / "peers.yaml").write_text(peers)
    return make_stack(tmp, root, config, **env)


@pytest.fixture
def stacks(tmp_path: Path):
    made: list[Stack] = []

    def make(name: str, models: tuple[str, ...], peers: str = "", **env: str) -> Stack:
        stack = _stack(tmp_path / name, models, peers, **env)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.stop()


def _loaded(stack: Stack, headers: dict) -> set[str]:
    status, body = http("GET", stack.url + "/running", headers=headers)
    assert status == 200, body
    return {m["id"] for m in body["models"] if m["state"] == "loaded"}


def _peer_row(stack: Stack, name: str) -> dict:
    _, body = http("GET", stack.url + "/running", headers=A_KEY)
    return next((p for p in body["peers"] if p["name"] == name),
                {"up": False, "state": None, "models": [], "loaded": []})


def test_a_peers_models_are_listed_served_and_survive_its_restart(stacks) -> None:
    b = stacks("b", ("beta", "both"), API_KEY="b-key").start()
    a = stacks("a", ("alpha", "both"), f"peers:\n  b:\n    url: {b.url}\n    api_key: b-key\n",
               API_KEY="a-key").start()
    wait(lambda: _peer_row(a, "b")["up"], 30)

    # listed, marked with its peer; a model on both is A's row, which names the peer
    status, body = http("GET", a.url + "/v1/models", headers=A_KEY)
    assert status == 200, body
    rows = {r["id"]: r for r in body["data"]}
    assert rows[BETA]["owned_by"] == "peer:b"
    assert rows[BETA]["peer"] == {"name": "b", "url": b.url, "kind": "model-serve"}
    assert rows[ALPHA]["owned_by"] == "model-serve" and "peer" not in rows[ALPHA]
    assert rows[BOTH]["owned_by"] == "model-serve" and rows[BOTH]["peers"] == ["b"]
    status, tags = http("GET", a.url + "/api/tags", headers=A_KEY)
    assert {"name": "b", "url": b.url, "kind": "model-serve"} in \
        [t.get("peer") for t in tags["models"] if t["name"] == BETA]
    # B, asked by A (the hop mark), lists its own models only: no loop
    _, own = http("GET", b.url + "/v1/models",
                  headers={**B_KEY, "X-Model-Serve-Peer-Hop": "1"})
    assert all(r.get("backend") != "peer" for r in own["data"])

    # chat and a stream through A, with the official SDK; B loads it
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="a-key", max_retries=0)
    answer = client.chat.completions.create(**chat(BETA))
    assert answer.model == BETA and answer.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(**chat(BETA, stream=True)))
    assert chunks and all(c.model == BETA for c in chunks)
    assert BETA in _loaded(b, B_KEY) and BETA not in _loaded(a, A_KEY)
    # the peer's name picks it explicitly
    assert client.chat.completions.create(**chat(f"b/{BETA}")).model == f"b/{BETA}"
    # Anthropic's Messages and Ollama's chat, through A to B
    status, msg = http("POST", a.url + "/v1/messages", {**chat(BETA), "max_tokens": 4},
                       headers={"x-api-key": "a-key"})
    assert status == 200 and msg["type"] == "message", msg
    status, reply = http("POST", a.url + "/api/chat", {**chat(BETA), "stream": False},
                         headers=A_KEY)
    assert status == 200 and reply["done"] is True and reply["model"] == BETA, reply
    # a model served here is served here
    assert http("POST", a.url + "/v1/chat/completions", chat(BOTH), A_KEY)[0] == 200
    assert BOTH in _loaded(a, A_KEY) and BOTH not in _loaded(b, B_KEY)

    # the peer's state in /running and /metrics
    row = _peer_row(a, "b")
    assert row["up"] and row["latency_ms"] is not None and BETA in row["models"]
    _, metrics = http("GET", a.url + "/metrics", headers=A_KEY)
    assert 'model_serve_peer_up{peer="b"} 1.0' in metrics
    assert 'model_serve_peer_models{peer="b"} 2.0' in metrics
    assert 'backend="peer"' in metrics

    # B stopped: 503 naming the peer within 10 s; A's own model answers
    b.stop()
    start = time.monotonic()
    status, err = http("POST", a.url + "/v1/chat/completions", chat(BETA), A_KEY)
    assert time.monotonic() - start < 10
    assert status == 503 and "peer b" in err["error"]["message"] and b.url in \
        err["error"]["message"], err
    status, err = http("POST", a.url + "/v1/messages", chat(BETA),
                       headers={"x-api-key": "a-key"})
    assert status == 503 and err["type"] == "error" and "peer b" in err["error"]["message"]
    assert http("POST", a.url + "/v1/chat/completions", chat(ALPHA), A_KEY)[0] == 200
    wait(lambda: not _peer_row(a, "b")["up"], 10)
    _, body = http("GET", a.url + "/v1/models", headers=A_KEY)
    assert BETA not in {r["id"] for r in body["data"]}  # a down peer's models are left out

    # B back: it answers again within 30 s, A never restarted
    b.start()
    back = time.monotonic()
    wait(lambda: http("POST", a.url + "/v1/chat/completions", chat(BETA), A_KEY)[0] == 200,
         30)
    assert time.monotonic() - back < 30


def test_a_model_that_cannot_start_here_now_is_served_by_a_peer(stacks, tmp_path) -> None:
    machine = tmp_path / "memory.json"  # A: a machine too small for any model
    machine.write_text(json.dumps({"total": 1000, "base_used": 0}))
    b = stacks("b", ("both",)).start()
    a = stacks("a", ("both",), f"peers:\n  b:\n    url: {b.url}\n",
               MEMORY_SIMULATION_FILE=str(machine), PEER_POLL_SECONDS="1").start()
    assert http("POST", b.url + "/v1/chat/completions", chat(BOTH))[0] == 200  # loaded on B
    wait(lambda: BOTH in _peer_row(a, "b")["loaded"], 30)
    status, body = http("POST", a.url + "/v1/chat/completions", chat(BOTH))
    assert status == 200 and body["model"] == BOTH, body
    assert BOTH not in _loaded(a, {})


def test_an_openai_server_as_a_peer(stacks, tmp_path) -> None:
    model = tmp_path / "bare" / "bare.gguf"
    write_model(model, name="bare")
    port = free_port()
    log = open(tmp_path / "bare.log", "wb")  # noqa: SIM115 - lives with the process
    server = subprocess.Popen([find_llama_server(load({})), "-m", str(model), "--port",
                               str(port), "--host", "127.0.0.1", "--alias", "bare-tiny",
                               "-c", "256"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: _answers(url + "/health"), 60)
        a = stacks("a", ("alpha",), f"peers:\n  bare:\n    url: {url}\n    kind: openai\n"
                   "  broken:\n    url: nowhere\n    kind: llama-swap\n").start()
        wait(lambda: _peer_row(a, "bare")["up"], 30)
        _, body = http("GET", a.url + "/v1/models")
        rows = {r["id"]: r for r in body["data"]}
        assert rows["bare-tiny"]["owned_by"] == "peer:bare"
        status, answer = http("POST", a.url + "/v1/chat/completions", chat("bare-tiny"))
        assert status == 200 and answer["choices"], answer
        # a route an OpenAI server does not answer: 400 naming the peer, in Ollama's shape
        status, err = http("POST", a.url + "/api/chat", chat("bare-tiny"))
        assert status == 400 and "peer bare" in err["error"] and "/v1/" in err["error"]
        assert "peers.broken.url" in a.logs()  # the bad entry is named, the rest used
        asyncio.run(_dashboard_shows(a.url))
    finally:
        server.terminate()
        server.wait(10)


async def _dashboard_shows(url: str) -> None:
    """The dashboard's Peers section, and the peer's model in the table, marked with it."""
    async with Chromium() as browser:
        page = await browser.open(url + "/")
        peer = "document.querySelector('#peer-table tr[data-peer=\"bare\"]')"
        assert await page.until(f"{peer}?.dataset.up") == "true"
        assert await page.js(f"{peer}.children[3].textContent") == "1"
        cell = "document.querySelector('tr[data-model=\"bare-tiny\"] td:nth-child(3)')"
        assert await page.until(f"{cell}?.textContent") == "peer bare"


async def _dashboard_state(url: str, peer: str, state: str) -> None:
    async with Chromium() as browser:
        page = await browser.open(url + "/")
        cell = f"document.querySelector('#peer-table tr[data-peer=\"{peer}\"] td:nth-child(2)')"
        assert await page.until(f"{cell}?.textContent") == state


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


def test_peers_config_problems_name_file_key_and_reason(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "peers.yaml").write_text(
        "peers:\n  good:\n    url: http://studio.local:5846/\n    api_key_env: STUDIO_KEY\n"
        "    models: ['qwen*']\n  bad:\n    url: http://x:1\n    kind: vllm\n")
    settings = load({"CONFIG_DIR": str(tmp_path),
                     "MODEL_SERVE_ENV_FILE": str(tmp_path / "no.env"),
                     "PEERS": "http://studio.local:5846,http://other.lan:5846"})
    monkeypatch.setenv("STUDIO_KEY", "k")
    peers, notices = load_peers(settings)
    assert [(p.name, p.url, p.kind, p.api_key, p.models) for p in peers] == [
        ("good", "http://studio.local:5846", "model-serve", "k", ("qwen*",)),
        ("other.lan", "http://other.lan:5846", "model-serve", "", ())]
    assert notices == [f"{tmp_path / 'peers.yaml'}: peers.bad.kind: expected one of "
                       "model-serve, llama-swap, ollama, openai, got 'vllm'; this peer is "
                       "left out"]


def test_an_ollama_as_a_peer(stacks, real_ollama) -> None:
    real_ollama.create("olla:1b")
    a = stacks("a", ("alpha",), f"peers:\n  lan:\n    url: {real_ollama.url}\n"
               "    kind: ollama\n")
    a.env["PEER_POLL_SECONDS"] = "1"
    a.start()
    wait(lambda: "olla:1b" in _peer_row(a, "lan")["models"], 30)
    _, tags = http("GET", a.url + "/api/tags")
    assert [t["peer"]["name"] for t in tags["models"] if t["name"] == "olla:1b"] == ["lan"]
    _, own = http("GET", real_ollama.url + "/api/tags")  # its own row, with the peer's mark
    assert next(t for t in tags["models"] if t["name"] == "olla:1b") == \
        {**next(t for t in own["models"] if t["name"] == "olla:1b"), "peer": {
            "name": "lan", "url": real_ollama.url, "kind": "ollama"}}
    status, reply = http("POST", a.url + "/api/chat", {**chat("olla:1b"), "stream": False})
    assert status == 200 and reply["done"] is True and reply["model"] == "olla:1b", reply
    status, answer = http("POST", a.url + "/v1/chat/completions", chat("lan/olla:1b"))
    assert status == 200 and answer["model"] == "lan/olla:1b", answer
    wait(lambda: "olla:1b" in _peer_row(a, "lan")["loaded"], 30)


def test_a_peers_model_does_not_make_this_stacks_ollama_list_its_models(
        stacks, real_ollama) -> None:
    """A name only a peer has is looked up in Ollama's cached list, not asked of Ollama
    again at each request (a listing reads every manifest)."""
    b = stacks("b", ("beta",)).start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n",
               OLLAMA_BASE=real_ollama.url).start()
    wait(lambda: _peer_row(a, "b")["up"], 30)
    listings = real_ollama.log_text().count('"/api/tags"')
    for _ in range(6):
        assert http("POST", a.url + "/v1/chat/completions", chat(BETA))[0] == 200
        assert http("POST", a.url + "/api/chat", {**chat(BETA), "stream": False})[0] == 200
    assert real_ollama.log_text().count('"/api/tags"') - listings <= 2


def _llama_swap(tmp: Path, model: str) -> tuple[str, subprocess.Popen]:
    """The real llama-swap on a free port, serving one tiny model by the real llama-server in
    a group that never swaps; its base URL once it answers."""
    binary = llama_swap()  # skips where there is none
    gguf = tmp / "swap" / "swap.gguf"
    write_model(gguf, name="swap")
    port, model_port = free_ports(2)
    cmd = shlex.join([find_llama_server(load({})), "--host", "127.0.0.1", "--port", "PORT",
                      "--alias", model, "-m", str(gguf), "-c", "256"])
    config = {"healthCheckTimeout": 60, "startPort": model_port,
              "models": {model: {"cmd": cmd.replace(" PORT ", " ${PORT} ")}},
              "groups": {"all": {"swap": False, "exclusive": False, "members": [model]}}}
    file = tmp / "swap" / "llama-swap.yaml"
    file.write_text(yaml.safe_dump(config))
    log = open(tmp / "swap" / "llama-swap.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([str(binary), "--config", str(file), "--listen",
                             f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _answers(url + "/v1/models"), 30)
    except AssertionError:
        proc.terminate()
        raise
    return url, proc


def test_a_llama_swap_as_a_peer(stacks, tmp_path) -> None:
    url, swap = _llama_swap(tmp_path, "swap-tiny")
    try:
        a = stacks("a", ("alpha",), f"peers:\n  swap:\n    url: {url}\n"
                   "    kind: llama-swap\n", PEER_POLL_SECONDS="1").start()
        wait(lambda: "swap-tiny" in _peer_row(a, "swap")["models"], 30)
        _, body = http("GET", a.url + "/v1/models")
        rows = {r["id"]: r for r in body["data"]}
        assert rows["swap-tiny"]["owned_by"] == "peer:swap"
        assert rows["swap-tiny"]["peer"] == {"name": "swap", "url": url, "kind": "llama-swap"}
        assert rows["swap-tiny"]["status"] == "unloaded"
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(**chat("swap-tiny"))
        assert answer.model == "swap-tiny" and answer.choices[0].message.content is not None
        chunks = list(client.chat.completions.create(**chat("swap/swap-tiny", stream=True)))
        assert chunks and all(c.model == "swap/swap-tiny" for c in chunks)
        # llama-swap's /running says it is loaded: so do A's /running and /v1/models
        wait(lambda: "swap-tiny" in _peer_row(a, "swap")["loaded"], 30)
        _, body = http("GET", a.url + "/v1/models")
        assert {r["id"]: r for r in body["data"]}["swap-tiny"]["status"] == "loaded"
        # Anthropic's Messages, which llama-swap routes by the model too
        status, msg = http("POST", a.url + "/v1/messages", chat("swap-tiny"))
        assert status == 200 and msg["type"] == "message" and msg["model"] == "swap-tiny", msg
        # a form's `model` reaches llama-swap as its id, which it routes by
        status, err = http("POST", a.url + "/v1/audio/transcriptions",
                           _form("swap/swap-tiny"), _FORM)
        assert "no router for requested model" not in str(err), (status, err)
    finally:
        swap.terminate()
        swap.wait(10)


_FORM = {"Content-Type": "multipart/form-data; boundary=b0undary"}


def _form(model: str) -> bytes:
    """A transcription request's form: its model, and a (not really) audio file."""
    return (f'--b0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}'
            '\r\n--b0undary\r\nContent-Disposition: form-data; name="file"; '
            'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n'
            '--b0undary--\r\n').encode()


def test_a_transcription_form_reaches_the_peer_with_its_own_name(stacks) -> None:
    b = stacks("b", ("beta",)).start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n",
               PEER_POLL_SECONDS="1").start()
    wait(lambda: _peer_row(a, "b")["up"], 30)
    # B's own answer (beta transcribes nothing) names the model as B got it
    status, err = http("POST", a.url + "/v1/audio/transcriptions", _form(f"b/{BETA}"), _FORM)
    assert status == 400 and BETA in err["error"]["message"] and \
        f"b/{BETA}" not in err["error"]["message"], err


def test_a_peer_is_chosen_by_its_room_for_the_model(stacks, tmp_path) -> None:
    tiny = tmp_path / "tiny.json"  # a machine too small for any model: A's, and small's
    tiny.write_text(json.dumps({"total": 100_000, "base_used": 0}))
    small = stacks("small", ("both",), MEMORY_SIMULATION_FILE=str(tiny)).start()
    big = stacks("big", ("both",)).start()
    a = stacks("a", ("both",), f"peers:\n  small:\n    url: {small.url}\n"
               f"  big:\n    url: {big.url}\n", MEMORY_SIMULATION_FILE=str(tiny),
               PEER_POLL_SECONDS="1", LOAD_WAIT="2").start()
    wait(lambda: _peer_row(a, "small")["up"] and _peer_row(a, "big")["up"], 30)
    assert 0 < _peer_row(a, "small")["room"] < 100_000  # some room, too little for it
    status, body = http("POST", a.url + "/v1/chat/completions", chat(BOTH))
    assert status == 200 and body["model"] == BOTH, body
    assert BOTH in _loaded(big, {}) and BOTH not in _loaded(small, {}) | _loaded(a, {})

    # only the peer with too little room: the request waits here, as without peers
    big.stop()
    wait(lambda: not _peer_row(a, "big")["up"], 30)
    status, err = http("POST", a.url + "/v1/chat/completions", chat(BOTH))
    assert status == 503 and err["error"]["code"] == "insufficient_memory", err
    assert BOTH not in _loaded(small, {})


def test_doctor_names_peers_problems_and_whether_each_answers(stacks, tmp_path) -> None:
    b = stacks("b", ("beta", "both")).start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n    models: ['*beta*']\n"
               f"  gone:\n    url: http://127.0.0.1:{free_port()}\n"
               "  odd:\n    url: http://x:1\n    kind: vllm\n",
               PEERS=f"http://localhost:{free_port()}")
    out = a.cli("doctor").stdout
    assert f"OK    peer b (model-serve, {b.url}): up, 1 model(s)" in out, out
    assert "WARN  peer gone (model-serve, http://127.0.0.1:" in out and ": down: " in out, out
    assert "WARN  peers: " in out and "peers.yaml: peers.odd.kind: expected one of" in out, out
    # the fix names where each peer came from: peers.yaml, or PEERS (no entry there)
    gone, bare = out.split("WARN  peer gone")[1], out.split("WARN  peer localhost")[1]
    assert "peers.yaml" in gone.split("WARN")[0] and "PEERS in .env" not in gone.split("WARN")[0]
    assert "PEERS in .env" in bare.split("WARN")[0], out


def _ollama_lines(url: str, path: str, body: dict) -> list[bytes]:
    """A stream's lines as they came, for what a client that reads it sees."""
    request = urllib.request.Request(url + path, json.dumps(body).encode(), A_KEY)
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read().splitlines()


def test_ollamas_api_through_a_model_serve_peer(stacks) -> None:
    """Ollama's streams end cleanly, carry the `<peer>/<id>` name asked, and the lists carry
    the peer's own rows; `<peer>/<id>` for a model it does not have is answered here."""
    b = stacks("b", ("beta", "both"), API_KEY="b-key").start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n    api_key: b-key\n",
               API_KEY="a-key", PEER_POLL_SECONDS="1").start()
    wait(lambda: _peer_row(a, "b")["up"], 30)
    client = ollama.Client(host=a.url, headers=A_KEY)
    for name in (BETA, f"b/{BETA}"):
        parts = list(client.chat(model=name, messages=[{"role": "user", "content": "hi"}],
                                 stream=True, options={"num_predict": 4}))
        assert parts[-1].done and all(p.model == name for p in parts), parts
        parts = list(client.generate(model=name, prompt="hi", stream=True,
                                     options={"num_predict": 4}))
        assert parts[-1].done and all(p.model == name for p in parts), parts
        assert client.chat(model=name, messages=[{"role": "user", "content": "hi"}],
                           options={"num_predict": 4}).model == name
    lines = _ollama_lines(a.url, "/api/chat", {**chat(BETA), "stream": True})
    assert json.loads(lines[-1])["done"] is True and all(b"error" not in x for x in lines)
    assert "ended the stream before it was complete" not in a.logs()

    # the peer's own rows: created, context_length, ...; no `peers` naming itself
    _, own = http("GET", b.url + "/v1/models", headers={**B_KEY, HOP: "1"})
    _, body = http("GET", a.url + "/v1/models", headers=A_KEY)
    mine, theirs = {r["id"]: r for r in body["data"]}[BETA], \
        {r["id"]: r for r in own["data"]}[BETA]
    assert mine["created"] == theirs["created"] > 0 and "peers" not in mine
    assert mine["context_length"] == theirs["context_length"]
    assert mine["aliases"] == [f"b/{BETA}"] and mine["owned_by"] == "peer:b"
    _, own_tags = http("GET", b.url + "/api/tags", headers={**B_KEY, HOP: "1"})
    _, tags = http("GET", a.url + "/api/tags", headers=A_KEY)
    row = next(t for t in tags["models"] if t["name"] == BETA)
    assert row == {**next(t for t in own_tags["models"] if t["name"] == BETA),
                   "peer": {"name": "b", "url": b.url, "kind": "model-serve"}}
    assert row["size"] > 0 and row["digest"]

    # a model the peer does not have: 404 here, naming it and its closest names
    status, err = http("POST", a.url + "/v1/chat/completions", chat("b/ms/betta"), A_KEY)
    assert status == 404 and "peer b" in err["error"]["message"] and \
        BETA in err["error"]["message"], err
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="b/ms/betta", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "peer b" in e.value.error and BETA in e.value.error
    _, metrics = http("GET", a.url + "/metrics", headers=A_KEY)
    assert "b/ms/betta" not in metrics


def _write(file: Path, text: str, stamp: float) -> None:
    file.write_text(text)
    os.utime(file, (stamp, stamp))  # a new modification time, however coarse the clock


def _status_peers(stack: Stack, capsys) -> str:
    """`model status`'s peer lines (the harness's stack has no supervisord to status)."""
    stack_cmds._peer_lines(load(stack.env))
    return capsys.readouterr().out


def test_peers_yaml_is_read_again_and_a_wrong_key_is_unauthorized(stacks, capsys) -> None:
    b = stacks("b", ("beta",), API_KEY="b-key").start()
    a = stacks("a", ("alpha",), PEER_POLL_SECONDS="1").start()
    file = a.root / "config" / "peers.yaml"
    _write(file, f"peers:\n  b:\n    url: {b.url}\n    api_key: wrong\n", 1_000_000)
    wait(lambda: _peer_row(a, "b")["state"] == "unauthorized", 10)
    row = _peer_row(a, "b")
    assert not row["up"] and row["error"] == "peer b refused our key (401): check its api_key"
    status, err = http("POST", a.url + "/v1/chat/completions", chat(f"b/{BETA}"))
    assert status == 503 and "peer b refused our key (401): check its api_key" in \
        err["error"]["message"], err
    out = a.cli("doctor").stdout
    assert "peer b (model-serve" in out and "unauthorized: peer b refused our key (401)" in out
    assert "PEERS in .env" not in out, out
    status_out = _status_peers(a, capsys)
    assert f"peer b (model-serve, {b.url}): unauthorized, 0 model(s)" in status_out, status_out
    asyncio.run(_dashboard_state(a.url, "b", "unauthorized"))
    _write(file, f"peers:\n  b:\n    url: {b.url}\n    api_key: b-key\n", 2_000_000)
    wait(lambda: _peer_row(a, "b")["up"], 10)
    assert http("POST", a.url + "/v1/chat/completions", chat(BETA))[0] == 200
    assert f"peer b (model-serve, {b.url}): up, 1 model(s)" in _status_peers(a, capsys)


def test_a_hung_peer_ends_what_waits_for_it_once_marked_down(stacks) -> None:
    """B's proxy stopped (SIGSTOP: it takes connections, never answers): a request waiting
    for B is a 503 naming it, and a stream from B ends with its route's error, once the poll
    marks B down: within PEER_POLL_SECONDS + the poll's 3 s."""
    # a stream still under way when B stops: a tiny model writes thousands of tokens a
    # second, may pick its end-of-text at any time (--ignore-eos: it does not stop there),
    # and B relays them as fast
    b = stacks("b", ("beta",), DEFAULT_CTX_SIZE="65536")
    (Path(b.env["CONFIG_DIR"]) / "custom_models.yaml").write_text(
        f"models:\n  {BETA.removeprefix('ms/')}:\n    sampler_args: --ignore-eos\n")
    b.start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n",
               PEER_POLL_SECONDS="1").start()
    wait(lambda: _peer_row(a, "b")["up"], 30)
    assert http("POST", a.url + "/v1/chat/completions", chat(BETA))[0] == 200  # loaded
    [proxy] = [p for p in b.procs if p.args[-1] == "services.proxy"]
    bound = 1 + 3 + 3

    # a stream under way: Ollama's NDJSON, as the official client reads it
    stream = ollama.Client(host=a.url).generate(
        model=BETA, prompt="hi", stream=True, options={"num_predict": 100_000})
    next(stream)
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ollama.ResponseError) as e:
            for _ in stream:
                pass
        assert time.monotonic() - start < bound
        assert "peer b was marked down" in e.value.error, e.value.error

        start = time.monotonic()
        status, err = http("POST", a.url + "/v1/chat/completions", chat(BETA))
        assert time.monotonic() - start < bound
        assert status == 503 and err["error"]["code"] == "peer_unavailable" and \
            "peer b" in err["error"]["message"], err
        assert not _peer_row(a, "b")["loaded"]  # a down peer's loaded list is emptied
    finally:
        os.kill(proxy.pid, signal.SIGCONT)


def test_a_hung_peer_answers_a_waiting_request_503(stacks) -> None:
    b = stacks("b", ("beta",)).start()
    a = stacks("a", ("alpha",), f"peers:\n  b:\n    url: {b.url}\n",
               PEER_POLL_SECONDS="1").start()
    wait(lambda: _peer_row(a, "b")["up"], 30)
    [proxy] = [p for p in b.procs if p.args[-1] == "services.proxy"]
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        status, err = http("POST", a.url + "/v1/chat/completions", chat(BETA))
        assert time.monotonic() - start < 1 + 3 + 3
        assert status == 503 and err["error"]["code"] == "peer_unavailable" and \
            "peer b" in err["error"]["message"], err
        status, err = http("POST", a.url + "/api/chat", {**chat(BETA), "stream": False})
        assert status == 503 and "peer b" in err["error"], err
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    wait(lambda: _peer_row(a, "b")["up"], 10)
