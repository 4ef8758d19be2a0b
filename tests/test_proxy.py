"""The proxy in front of the real llama-server router, as a client sees it."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest

from shared.catalog import params_label
from shared.engines.base import section_name
from shared.gguf_header import read_header
from shared.tiny_gguf import write_model
from tests.harness import http
from tests.streams import chat, stream_chat

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"


@pytest.fixture
def stack(stack_factory, config_dir: Path):
    (config_dir / "custom_models.yaml").write_text("""
models:
  tiny:0.2m-f32:
    sampler_args: "--temp 0.3 --top-k 5"
  creative:
    base_model: tiny:0.2m-f32
    sampler_args: "--temp 1.5"
""")
    return stack_factory().start()


def loaded(stack) -> dict[str, str]:
    _, body = http("GET", stack.url + "/v1/models")
    return {m["id"]: m["status"] for m in body["data"]}


def test_two_models_alternate_and_stream_concurrently_and_both_stay_loaded(stack) -> None:
    assert loaded(stack) == {TINY: "unloaded", OTHER: "unloaded", "ms/creative": "unloaded"}
    for model in (TINY, OTHER, TINY, OTHER):
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(model))
        assert status == 200, body
        assert body["model"] == model and body["choices"][0]["message"]["role"] == "assistant"
    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(lambda m: stream_chat(stack.url, m, 32, ignore_eos=True),
                                 [TINY, OTHER] * 3))
    for model, events in zip([TINY, OTHER] * 3, streams, strict=True):
        assert len(events) > 2 and all(e["model"] == model for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    states = loaded(stack)
    assert states[TINY] == "loaded" and states[OTHER] == "loaded"


def test_alias_has_its_own_sampler_settings_and_name(stack) -> None:
    settings = {}
    for model in (TINY, "ms/creative"):
        status, body = http("POST", stack.url + "/v1/chat/completions",
                            chat(model, verbose=True))
        assert status == 200, body
        assert body["model"] == model  # the name the client asked for, not the engine's
        settings[model] = body["__verbose"]["generation_settings"]
    assert settings[TINY]["temperature"] == pytest.approx(0.3)
    assert settings[TINY]["top_k"] == 5
    assert settings["ms/creative"]["temperature"] == pytest.approx(1.5)
    assert loaded(stack)["ms/creative"] == "loaded"


def test_per_request_sampler_fields_reach_the_engine(stack) -> None:
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(
        TINY, verbose=True, top_n_sigma=1.25, min_p=0.07, top_k=9, temperature=0.9))
    assert status == 200, body
    got = body["__verbose"]["generation_settings"]
    assert got["top_n_sigma"] == pytest.approx(1.25) and got["min_p"] == pytest.approx(0.07)
    assert got["top_k"] == 9 and got["temperature"] == pytest.approx(0.9)


def test_colon_free_spelling_and_streamed_names(stack) -> None:
    events = stream_chat(stack.url, "ms/tiny-0.2m-f32", 8, ignore_eos=True)
    assert {e["model"] for e in events} == {"ms/tiny-0.2m-f32"}


def test_completions_route(stack) -> None:
    status, body = http("POST", stack.url + "/v1/completions",
                        {"model": OTHER, "prompt": "abc", "max_tokens": 3})
    assert status == 200 and body["model"] == OTHER and body["choices"][0]["text"] is not None


def error_of(status_body, status: int, code: str | None = None) -> dict:
    got, body = status_body
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"}
    err = body["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code
    return err


def test_errors_are_openai_shaped(stack) -> None:
    url = stack.url + "/v1/chat/completions"
    err = error_of(http("POST", url, b'{"model": '), 400, "invalid_json")
    assert "not valid JSON" in err["message"]
    error_of(http("POST", url, b"[1, 2]"), 400, "invalid_json")
    err = error_of(http("POST", url, {"messages": []}), 400, "missing_model")
    assert "'model' is required" in err["message"]
    err = error_of(http("POST", url, chat("ms/tinny:0.2m")), 404, "model_not_found")
    assert TINY in err["suggestions"] and TINY in err["message"]
    error_of(http("GET", stack.url + "/v1/nothing"), 404)


def test_body_over_the_limit_is_413(stack_factory) -> None:
    stack = stack_factory(MAX_BODY_BYTES="4096").start()
    big = chat(TINY) | {"messages": [{"role": "user", "content": "x" * 10000}]}
    err = error_of(http("POST", stack.url + "/v1/chat/completions", big), 413, "body_too_large")
    assert "MAX_BODY_BYTES" in err["message"]


def test_engine_down_is_503_with_what_to_do(stack_factory) -> None:
    stack = stack_factory()
    assert stack.cli("sync").returncode == 0  # the catalog exists, the engine is not running
    stack.start("proxy", wait=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            result = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    err = error_of(result, 503, "engine_unavailable")
    assert stack.engine_url in err["message"] and "make up" in err["message"]
    status, health = http("GET", stack.url + "/health")
    assert status == 503 and health["engine"]["ok"] is False


def test_a_model_that_fails_to_load_gives_the_engines_reason(stack_factory,
                                                              models_dir) -> None:
    broken = write_model(models_dir / "pub" / "broken" / "broken-F32.gguf", name="broken")
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header intact, tensors cut short
    stack = stack_factory().start()
    err = error_of(http("POST", stack.url + "/v1/chat/completions",
                        chat("ms/broken:0.2m-f32")), 500, "engine_error")
    assert "failed to load" in err["message"] and str(broken) in err["message"]
    assert "Traceback" not in err["message"]


def test_client_disconnect_cancels_the_upstream_request(stack_factory, models_dir) -> None:
    path = write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                       n_layer=8, n_head=8)
    stack = stack_factory().start()
    model = f"ms/slow:{params_label(read_header(path).param_count)}-f32"
    host, port = stack.url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(
        model, max_tokens=100000, stream=True, ignore_eos=True)),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(5):
        assert resp.readline()
    slots_url = f"{stack.engine_url}/slots?model={section_name(model)}"
    keyed = stack.engine_headers
    assert any(s["is_processing"] for s in http("GET", slots_url, headers=keyed)[1])
    conn.close()
    deadline = time.monotonic() + 10
    while any(s["is_processing"] for s in http("GET", slots_url, headers=keyed)[1]):
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.1)


def test_embedding_models_answer_embeddings(stack_factory, models_dir) -> None:
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    stack = stack_factory().start()
    status, body = http("POST", stack.url + "/v1/embeddings",
                        {"model": "ms/emb:0.2m-f32", "input": ["hello", "world"]})
    assert status == 200, body
    assert body["model"] == "ms/emb:0.2m-f32"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 64


def test_with_no_models_the_readme_example_answers(stack_factory, models_dir) -> None:
    for path in sorted(models_dir.rglob("*.gguf")):
        path.unlink()
    stack = stack_factory().start()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("ms/demo:0.2m-f32"))
    assert status == 200 and body["model"] == "ms/demo:0.2m-f32", body
    assert list(models_dir.rglob("*.gguf")) == []  # the demo lives in STATE_DIR


def test_api_key_guards_every_route_but_health(stack_factory) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    url = stack.url + "/v1/chat/completions"
    error_of(http("POST", url, chat(TINY)), 401, "invalid_api_key")
    error_of(http("GET", stack.url + "/v1/models",
                  headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    status, body = http("POST", url, chat(TINY), headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and body["model"] == TINY
    assert http("GET", stack.url + "/health")[0] == 200


def test_harmony_native_passes_chat_through_to_the_engine(stack_factory, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    harmony: native\n")
    stack = stack_factory().start()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
    assert status == 200 and "timings" in body  # llama-server's own chat endpoint answered
