"""What Open WebUI (its OpenAI and Ollama connections at once) found: the client's view of
an embedding model asked to chat, /api/tags' capabilities, an image for a model without a
projector, /api/ps named as /api/tags names, num_ctx on a model Ollama serves, one log line
per unload, and a blob Ollama has under a copied name (real llama-server; the real Ollama
via tests/real_ollama.py, skipped where there is none)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.real_ollama import RealOllama
from tests.test_direct_path import router

TINY = "ms/tiny:0.2m-f32"
HI = [{"role": "user", "content": "hi"}]
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42m"
         "NkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


@pytest.fixture
def engine_stack(stack_factory, models_dir):
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    return stack_factory().start()


def emb_id(stack) -> str:
    return next(m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]
                if m["id"].startswith("ms/emb"))


def test_an_embedding_model_refuses_to_chat_before_loading(engine_stack) -> None:
    url, emb = engine_stack.url, emb_id(engine_stack)
    for path, body in (("/v1/chat/completions", {"messages": HI}),
                       ("/v1/completions", {"prompt": "hi"}),
                       ("/v1/responses", {"input": "hi"}),
                       ("/completion", {"prompt": "hi"})):
        status, answer = http("POST", url + path, {"model": emb, "max_tokens": 2, **body})
        assert status == 400, (path, answer)
        assert answer["error"]["code"] == "not_chat_model"
        assert emb in answer["error"]["message"] and "/v1/embeddings" in \
            answer["error"]["message"]
    status, answer = http("POST", url + "/v1/messages",
                          {"model": emb, "max_tokens": 2, "messages": HI})
    assert status == 400 and answer["type"] == "error"  # Anthropic's shape
    assert answer["error"]["type"] == "invalid_request_error" and emb in \
        answer["error"]["message"]
    # Ollama's routes answer as Ollama 0.33 does, a load-only /api/generate too
    assert http("POST", url + "/api/chat", {"model": emb, "messages": HI}) == (
        400, {"error": f'"{emb}" does not support chat'})
    assert http("POST", url + "/api/generate", {"model": emb}) == (
        400, {"error": f'"{emb}" does not support generate'})
    assert http("GET", url + "/api/ps")[1]["models"] == []  # nothing was loaded for them
    status, answer = http("POST", url + "/v1/embeddings", {"model": emb, "input": "hi"})
    assert status == 200 and len(answer["data"][0]["embedding"]) == 64


def test_tags_rows_carry_capabilities_as_ollamas_do(engine_stack) -> None:
    rows = {m["name"]: m for m in http("GET", engine_stack.url + "/api/tags")[1]["models"]}
    assert rows[TINY]["capabilities"] == ["completion"]
    assert rows[emb_id(engine_stack)]["capabilities"] == ["embedding"]


def test_an_image_for_a_model_without_a_projector_is_a_400(engine_stack) -> None:
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": PIXEL}}]
    status, answer = http("POST", engine_stack.url + "/v1/chat/completions", {
        "model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
    assert status == 400, answer  # not a 5xx, which the OpenAI SDKs retry
    assert answer["error"]["message"].startswith("engine: image input is not supported")
    assert "mmproj" in answer["error"]["message"]


CHAT, COPY = "olla-chat:latest", "copy-chat:latest"  # one blob, two names (`ollama cp`)
OWN = "own-mxfp4:1b"  # answered by Ollama itself (ROUTE_TO_OLLAMA)


@pytest.fixture(scope="module")
def made(real_ollama: RealOllama) -> RealOllama:
    real_ollama.create(CHAT, seed=3)
    assert real_ollama.cli("cp", "olla-chat", "copy-chat").returncode == 0
    real_ollama.create(OWN, seed=5)
    return real_ollama


@pytest.fixture
def stack(stack_factory, made):
    made.unload_all()
    stack = stack_factory(OLLAMA_BASE=made.url, OLLAMA_MODELS=str(made.store)).start(
        "engine", "proxy", "sync")
    wait(lambda: any(a in (CHAT, COPY) for m in models(stack) for a in m.get("aliases", [])),
         30)
    return stack


def models(stack) -> list[dict]:
    return http("GET", stack.url + "/v1/models")[1]["data"]


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    """(status, body, headers)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_a_copied_name_is_another_name_of_the_same_served_model(stack, made) -> None:
    rows = [m for m in models(stack) if {CHAT, COPY} & set(m.get("aliases", []))]
    assert len(rows) == 1 and {CHAT, COPY} <= set(rows[0]["aliases"])
    for name in (CHAT, COPY, "copy-chat"):
        status, answer = http("POST", stack.url + "/v1/chat/completions",
                              {"model": name, "messages": HI, "max_tokens": 2})
        assert status == 200 and answer["model"] == name
    assert len(router(stack).children()) == 1  # one llama-server for both names


def test_ps_names_a_linked_model_as_tags_lists_it(stack, made) -> None:
    status, _ = http("POST", stack.url + "/api/generate", {"model": COPY})  # a load
    assert status == 200
    tags = [m["name"] for m in http("GET", stack.url + "/api/tags")[1]["models"]]
    ps = [m["name"] for m in http("GET", stack.url + "/api/ps")[1]["models"]]
    assert len(ps) == 1 and ps[0] in (CHAT, COPY)
    # the one Ollama's /api/tags lists first, as Open WebUI matches the two by name
    assert ps[0] == next(n for n in tags if n in (CHAT, COPY))
    assert not any(n.startswith("ms/") for n in ps)


def test_a_smaller_num_ctx_for_an_ollama_model_is_left_out(stack, made) -> None:
    configured = next(m for m in models(stack) if OWN in m.get("aliases", []) or
                      m["id"] == OWN)["context_length"]
    for path, body in (("/api/chat", {"options": {"num_ctx": configured // 2,
                                                  "num_predict": 2}, "stream": False}),
                       ("/v1/chat/completions", {"num_ctx": configured // 2,
                                                 "max_tokens": 2})):
        status, answer, headers = post(stack.url + path, {"model": OWN, "messages": HI,
                                                          **body})
        assert status == 200, answer
        assert f"num_ctx={configured // 2} not sent" in headers["X-Model-Serve-Warning"]
        assert str(configured) in headers["X-Model-Serve-Warning"]
    assert made.loaded()[OWN]["context_length"] == configured  # loaded once, as configured
    assert made.runner_starts() == 1
    status, answer, _ = post(stack.url + "/api/chat", {"model": OWN, "messages": HI,
                                                       "options": {"num_ctx": configured * 2}})
    assert status == 400 and f"num_ctx={configured * 2}" in answer["error"]
    status, answer, _ = post(stack.url + "/v1/chat/completions",
                             {"model": OWN, "messages": HI, "num_ctx": configured * 2})
    assert status == 400 and answer["error"]["code"] == "context_fixed"


def test_each_unload_is_one_line_in_the_proxy_log(stack, made) -> None:
    chat_id = next(m["id"] for m in models(stack) if CHAT in m.get("aliases", []))
    for name in (CHAT, OWN):
        assert http("POST", stack.url + "/api/chat", {"model": name, "messages": HI,
                                                      "stream": False,
                                                      "options": {"num_predict": 2}})[0] == 200
        assert http("POST", stack.url + "/api/generate",
                    {"model": name, "keep_alive": 0})[0] == 200
    wait(lambda: not made.loaded(), 30)
    log = (stack.root / "proxy.log").read_text()
    lines = [line for line in log.splitlines() if re.search(r"\bunloaded\b", line)]
    assert len([line for line in lines if chat_id in line]) == 1, lines
    assert len([line for line in lines if OWN in line]) == 1, lines
