"""What Open WebUI (its OpenAI and Ollama connections at once) found: the client's view of
an embedding model asked to chat, /api/tags' capabilities, an image for a model without a
projector, /api/ps named as /api/tags names, num_ctx on a model Ollama serves, one log line
per unload, and a blob Ollama has under a copied name (real llama-server; the real Ollama
via tests/real_ollama.py, skipped where there is none)."""

from __future__ import annotations

import pytest

from shared.tiny_gguf import write_model
from tests.harness import http, wait

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
