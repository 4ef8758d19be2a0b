"""OpenAI's model routes and Responses streams as the official clients read them: the Python
`openai` SDK, and the Node one (installed once into ~/.cache/model-serve/node-clients),
against the real stack and llama-server."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import openai
import pytest

from services.proxy.manage.info import ollama_created
from tests.harness import ROOT, http
from tests.test_engine_routes import ASCII, OTHER, TINY, gpt

# two days apart, neither of them today: each model's own time, not the stack's start
TIMES = {TINY: 1_700_000_000, OTHER: 1_700_172_800}
NODE_CLIENTS = Path.home() / ".cache" / "model-serve" / "node-clients"
NODE_OPENAI = "openai@6"


@pytest.fixture
def named(models_dir: Path, config_dir: Path) -> None:
    """tiny with an alias; each model file with a modification time of its own."""
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    aliases: [greeter]\n")
    os.utime(models_dir / "pub" / "tiny-GGUF" / "tiny-F32.gguf", (TIMES[TINY],) * 2)
    os.utime(models_dir / "ollama" / "other" / "other-0.2m-f32.gguf", (TIMES[OTHER],) * 2)


@pytest.fixture
def stack(stack_factory, named):
    return stack_factory().start()


def listed(stack, headers: dict | None = None) -> dict[str, dict]:
    status, body = http("GET", stack.url + "/v1/models", headers=headers)
    assert status == 200, body
    return {row["id"]: row for row in body["data"]}


def test_python_sdk_retrieves_a_model_by_any_of_its_names(stack) -> None:
    client = gpt(stack)
    rows = {m.id: m.model_dump() for m in client.models.list()}
    assert "greeter" in rows[TINY]["aliases"]
    # the SDK sends the id encoded (ms%2Ftiny%3A0.2m-f32)
    for name in (TINY, "greeter", "tiny:0.2m-f32", "tiny-0.2m-f32"):
        model = client.models.retrieve(name)
        assert model.model_dump() == rows[TINY], name
    assert client.models.retrieve(OTHER).id == OTHER
    # raw, encoded and not: the same object as the list's
    for path in ("ms%2Ftiny%3A0.2m-f32", "ms/tiny:0.2m-f32", "ms%2Ftiny:0.2m-f32"):
        assert http("GET", f"{stack.url}/v1/models/{path}") == (200, listed(stack)[TINY]), path


def test_an_unknown_model_is_a_404_in_openais_shape(stack) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        gpt(stack).models.retrieve("ms/tinny:0.2m-f32")
    assert raised.value.code == "model_not_found"
    assert "'ms/tinny:0.2m-f32' not found" in raised.value.message
    assert TINY in raised.value.body["suggestions"]
    status, body = http("GET", stack.url + "/v1/models/nothing%2Flike%3Ait")
    assert status == 404 and set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert "'nothing/like:it'" in body["error"]["message"]


def test_each_model_is_created_at_its_files_time_across_restarts(stack) -> None:
    rows = listed(stack)
    assert {mid: rows[mid]["created"] for mid in TIMES} == TIMES
    stack.restart("proxy")
    assert {mid: row["created"] for mid, row in listed(stack).items()} == \
        {mid: row["created"] for mid, row in rows.items()}
    assert gpt(stack).models.retrieve(OTHER).created == TIMES[OTHER]


def test_models_retrieve_asks_for_the_api_key(stack_factory, named) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    with pytest.raises(openai.AuthenticationError):
        gpt(stack).models.retrieve(TINY)
    status, body = http("GET", stack.url + "/v1/models/" + TINY)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="s3cret", max_retries=0)
    assert client.models.retrieve("greeter").id == TINY
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ms/nope:1b")


def sse_events(stack, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(stack.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


def test_responses_streams_open_with_an_empty_output(stack) -> None:
    """llama-server's response.created (and .in_progress) has no `output`; the Node SDK's
    stream helper iterates it."""
    events = sse_events(stack, "/v1/responses", {"model": TINY, "input": "hi",
                                                 "max_output_tokens": 8, "stream": True,
                                                 **ASCII})
    opening = [e for e in events if e["type"] in ("response.created", "response.in_progress")]
    assert opening and opening[0] is events[0]
    assert all(e["response"]["output"] == [] for e in opening)
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"]
    # the Python SDK's helper reads the same stream
    with gpt(stack).responses.stream(model=TINY, input="hi", max_output_tokens=8,
                                     extra_body=ASCII) as helper:
        [first, *_] = list(helper)
        assert first.type == "response.created" and first.response.output == []
        assert helper.get_final_response().status == "completed"


def node_openai() -> Path:
    """The Node `openai` SDK's node_modules, installed once into NODE_CLIENTS (a lock keeps
    two test runs from installing at once); skips where node or npm is missing."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed for the Node openai SDK's test")
    modules = NODE_CLIENTS / "node_modules"
    NODE_CLIENTS.mkdir(parents=True, exist_ok=True)
    with open(NODE_CLIENTS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (modules / "openai" / "package.json").exists():
            package = NODE_CLIENTS / "package.json"
            if not package.exists():
                package.write_text('{"name": "model-serve-node-clients", "private": true}\n')
            done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", NODE_OPENAI],
                                  cwd=NODE_CLIENTS, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"npm install {NODE_OPENAI} failed:\n{done.stderr}"
    return modules


def test_node_sdk_retrieves_models_and_follows_a_responses_stream(stack) -> None:
    modules = node_openai()
    done = subprocess.run(["node", str(ROOT / "tests" / "node_openai.cjs"),
                           stack.url + "/v1", TINY, "greeter"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NODE_PATH": str(modules)})
    assert done.returncode == 0, done.stderr + "\n" + stack.logs()
    seen = json.loads(done.stdout)
    assert {TINY, OTHER} <= set(seen["listed"])
    row = listed(stack)[TINY]  # loaded by now: its status aside, the object the list gives
    assert seen["retrieved"] == row | {"status": seen["retrieved"]["status"]}
    assert seen["byAlias"] == TINY
    assert seen["unknown"]["status"] == 404 and seen["unknown"]["notFound"]
    assert seen["unknown"]["error"]["code"] == "model_not_found"
    assert seen["events"][0] == "response.created"
    assert seen["events"][-1] == "response.completed"
    assert seen["final"] == {"model": TINY, "status": "completed", "text": seen["deltas"]}


def test_ollamas_own_models_are_created_at_their_modified_time() -> None:
    """Ollama writes nanoseconds and a zone; a row without a time is 0, never today."""
    assert ollama_created({"modified_at": "2023-11-14T22:13:20.123456789Z"}) == 1_700_000_000
    assert ollama_created({"modified_at": "2023-11-15T00:13:20.5+02:00"}) == 1_700_000_000
    assert ollama_created({}) == 0
