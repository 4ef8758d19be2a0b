"""Ollama's native API on the proxy's port, as Ollama's own Python client sees it: the
engine's models (real llama-server) translated, Ollama's own (the stand-in) passed on."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import ollama
import pytest

from services.proxy.ollama_convert import Answer, Stats, Stream, chat_body
from shared.catalog import Entry
from shared.tiny_gguf import write_model
from tests.harness import free_port, http, start_ollama, wait
from tests.ollama_store import add_model
from tests.test_direct_path import model_process

TINY = "ms/tiny:0.2m-f32"
OWN = "mlx-safetensors:1b"  # Ollama's own: not GGUF, so the engine never serves it
NOT_A_MODEL = b'{"__metadata__": {}}' + b"\0" * 64


@pytest.fixture
def stack(stack_factory, ollama):
    url, store = ollama
    add_model(store, OWN, data=NOT_A_MODEL)
    return stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start()


def client(stack) -> ollama.Client:
    return ollama.Client(host=stack.url)


def seen_by_ollama(url: str) -> list[dict]:
    return http("GET", url + "/_standin/requests")[1]


def ndjson(url: str, path: str, body: dict) -> tuple[str, list[dict]]:
    """(content type, lines) of a raw request, as a client without the SDK reads it."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.headers["Content-Type"], [json.loads(line) for line in r if line.strip()]


def test_chat_on_an_engine_model_whole_and_streamed(stack) -> None:
    c = client(stack)
    options = {"num_predict": 6, "temperature": 0, "seed": 1}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = c.chat(TINY, messages=messages, options=options, stream=False)
    assert whole.model == TINY and whole.done and whole.message.role == "assistant"
    assert whole.done_reason in ("stop", "length")
    assert 0 < whole.eval_count <= 6 and whole.prompt_eval_count > 0
    assert whole.total_duration > 0 and whole.created_at

    parts = list(c.chat(TINY, messages=messages, options=options, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason

    # Ollama streams when `stream` is not given
    kind, lines = ndjson(stack.url, "/api/chat", {"model": TINY, "messages": messages,
                                                  "options": options})
    assert kind.startswith("application/x-ndjson") and len(lines) > 1
    assert lines[-1]["done"] is True and lines[-1]["message"]["role"] == "assistant"


def test_generate_templated_and_raw(stack) -> None:
    c = client(stack)
    answer = c.generate(TINY, prompt="hi", system="be brief", options={"num_predict": 4})
    assert answer.done and isinstance(answer.response, str) and 0 < answer.eval_count <= 4
    raw = c.generate(TINY, prompt="<|user|>hi\n<|assistant|>", raw=True,
                     options={"num_predict": 4})
    assert raw.done and raw.eval_count > 0
    parts = list(c.generate(TINY, prompt="hi", options={"num_predict": 4}, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])


def test_list_show_ps_version_and_the_probe(stack) -> None:
    c = client(stack)
    listed = {m.model: m for m in c.list().models}
    assert {TINY, "ms/other:0.2m-f32", OWN} <= set(listed)
    tiny = listed[TINY]
    assert tiny.size > 0 and len(tiny.digest) == 64 and tiny.modified_at
    assert (tiny.details.format, tiny.details.family, tiny.details.quantization_level) == (
        "gguf", "llama", "F32")
    assert tiny.details.parameter_size == "164.5K"

    shown = c.show(TINY)
    assert "<|assistant|>" in shown.template  # the GGUF's chat template
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096
    assert shown.modelinfo["general.parameter_count"] == 164544
    assert "num_ctx 4096" in shown.parameters
    assert c.show(OWN).template == "{{ .Prompt }}"  # Ollama's own answer

    assert c.ps().models == []
    c.generate(TINY, prompt="")  # a load, as Ollama's clients preload
    running = {m.model: m for m in c.ps().models}
    assert set(running) == {TINY}
    assert running[TINY].size > 0 and running[TINY].context_length == 4096
    assert running[TINY].expires_at and running[TINY].details.family == "llama"
    c.chat(OWN, messages=[{"role": "user", "content": "hi"}])  # Ollama loads its own
    assert {m.model for m in c.ps().models} == {TINY, OWN}

    status, body = http("GET", stack.url + "/api/version")
    assert status == 200 and body["version"] == "0.14.0" and body["model_serve"]
    status, text = http("GET", stack.url + "/")
    assert status == 200 and text == "Ollama is running"
    req = urllib.request.Request(stack.url + "/", method="HEAD")
    with urllib.request.urlopen(req) as r:
        assert r.status == 200


def test_ollamas_own_models_are_passed_on(stack, ollama) -> None:
    url, _ = ollama
    c = client(stack)
    answer = c.chat(OWN, messages=[{"role": "user", "content": "hi"}], stream=False,
                    options={"temperature": 0.5})
    assert answer.message.content == f"Hello from {OWN}" and answer.model == OWN
    sent = seen_by_ollama(url)[-1]
    assert sent["path"] == "/api/chat" and sent["options"] == {"temperature": 0.5}
    parts = list(c.chat(OWN, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content for p in parts).strip() == f"Hello from {OWN}"
    assert parts[-1].done and parts[-1].eval_count
    assert c.generate(OWN, prompt="hi").done
    embedded = c.embed(OWN, input=["a", "b"])
    assert len(embedded.embeddings) == 2 and seen_by_ollama(url)[-1]["path"] == "/api/embed"


def test_keep_alive_zero_unloads_after_the_answer(stack) -> None:
    c = client(stack)
    loaded = c.chat(TINY, messages=[])
    assert loaded.done_reason == "load" and [m.model for m in c.ps().models] == [TINY]
    c.chat(TINY, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2},
           keep_alive=0)
    wait(lambda: c.ps().models == [])  # the engine ends the model's process after answering
    c.generate(TINY, prompt="")
    assert c.generate(TINY, prompt="", keep_alive=0).done_reason == "unload"
    wait(lambda: c.ps().models == [])
    c.chat(TINY, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2},
           keep_alive="10m")  # accepted: the model's TTL decides
    assert [m.model for m in c.ps().models] == [TINY]


def test_options_reach_the_engine_and_num_ctx_is_checked(stack) -> None:
    c = client(stack)
    messages = [{"role": "user", "content": "hi"}]
    same = [c.chat(TINY, messages=messages, options={
        "num_predict": 8, "seed": 3, "temperature": 0.9, "top_k": 40, "top_p": 0.9,
        "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.1, "presence_penalty": 0.1,
        "frequency_penalty": 0.1, "stop": ["zz"], "num_ctx": 2048}).message.content
        for _ in range(2)]
    assert same[0] == same[1]  # the seed reached the engine
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(TINY, messages=messages, options={"num_ctx": 100000})
    assert e.value.status_code == 400 and "num_ctx 100000" in e.value.error
    assert "4096" in e.value.error


def test_a_tool_conversation_and_images_reach_the_engine(stack) -> None:
    c = client(stack)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]
    answer = c.chat(TINY, messages=messages, tools=tools, options={"num_predict": 4},
                    think=False)
    assert answer.done and answer.message.thinking is None
    with pytest.raises(ollama.ResponseError) as e:  # the tiny model has no projector
        c.chat(TINY, messages=[{"role": "user", "content": "what is it?",
                                "images": ["iVBORw0KGgo="]}])
    assert e.value.status_code >= 400 and "image" in e.value.error.lower()


def test_embeddings_of_an_engine_model(stack_factory, models_dir, ollama) -> None:
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    url, store = ollama
    stack = stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start()
    c = client(stack)
    model = next(m.model for m in c.list().models if m.model.startswith("ms/emb"))
    assert c.show(model).capabilities == ["embedding"]
    many = c.embed(model, input=["a", "bb", "ccc"])
    assert many.model == model and len(many.embeddings) == 3
    assert all(len(v) == 64 for v in many.embeddings) and many.prompt_eval_count > 0
    assert len(c.embed(model, input="one").embeddings) == 1
    assert len(c.embeddings(model, prompt="one").embedding) == 64


def test_errors_are_in_ollamas_shape(stack) -> None:
    c = client(stack)
    with pytest.raises(ollama.ResponseError) as e:
        c.chat("ms/tiny:0.2m-f33", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and TINY in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.show("nothing-like-it")
    assert e.value.status_code == 404
    for path, body, status in (
            ("/api/chat", b"{not json", 400),
            ("/api/chat", json.dumps({"messages": []}).encode(), 400),
            ("/api/chat", json.dumps({"model": TINY, "messages": "hi"}).encode(), 400),
            ("/api/generate", json.dumps({"model": TINY, "prompt": "x",
                                          "format": 3}).encode(), 400),
            ("/api/nothing", b"{}", 404)):
        got, answer = http("POST", stack.url + path, body)
        assert got == status and isinstance(answer["error"], str), (path, answer)
    got, answer = http("GET", stack.url + "/api/chat")
    assert got == 405 and isinstance(answer["error"], str)


def test_model_management_goes_to_ollama(stack) -> None:
    c = client(stack)
    progress = list(c.pull("fresh:1b", stream=True))
    assert progress[-1].status == "success"
    assert "fresh:1b" in {m.model for m in c.list().models}
    assert c.chat("fresh:1b", messages=[{"role": "user", "content": "hi"}]).done
    c.delete("fresh:1b")
    assert "fresh:1b" not in {m.model for m in c.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("fresh:1b")
    assert e.value.status_code == 404


def test_without_ollama_the_engine_models_still_answer(stack_factory, models_dir) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    stack = stack_factory(OLLAMA_BASE=base,
                          OLLAMA_MODELS=str(Path(models_dir).parent / "o")).start()
    c = client(stack)
    assert TINY in {m.model for m in c.list().models}
    assert c.chat(TINY, messages=[{"role": "user", "content": "hi"}],
                  options={"num_predict": 2}).done
    assert http("GET", stack.url + "/api/version")[1]["version"] == "0.12.0"
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("x:1b")
    assert e.value.status_code == 503 and base in e.value.error


# The tiny models never call tools or think, and their byte vocabulary makes llama-server
# refuse grammars (json formats): those translations are checked on the engine's shapes.

def test_tool_calls_and_thinking_come_back_as_ollama_sends_them() -> None:
    calls = [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    whole = Answer("m", True, None, Stats(0)).whole({
        "choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "", "reasoning_content": "hmm",
            "tool_calls": calls}}], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
    assert whole["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert whole["message"]["thinking"] == "hmm" and whole["done_reason"] == "stop"
    assert (whole["prompt_eval_count"], whole["eval_count"]) == (5, 9)

    stream = Stream(Answer("m", True, False, Stats(0)))  # think: false hides the thinking
    pieces = [{"choices": [{"delta": {"reasoning_content": "hmm"}}]},
              {"choices": [{"delta": {"content": "ok"}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
                  "name": "get_weather", "arguments": '{"ci'}}]}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
                  "arguments": 'ty": "Rome"}'}}]}, "finish_reason": "tool_calls"}]}]
    lines = [json.loads(x) for p in pieces for x in stream.feed(p).splitlines()]
    lines += [json.loads(x) for x in stream.end().splitlines()]
    assert [x["message"].get("content") for x in lines] == ["ok", "", ""]
    assert lines[1]["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert lines[-1]["done"] and not any("thinking" in x["message"] for x in lines)


def test_requests_become_the_engines_fields() -> None:
    entry = Entry(id="ms/m", path="", ctx_size=4096)
    body = chat_body({"model": "m", "format": {"type": "object"}, "think": True,
                      "options": {"num_predict": -1, "stop": "x", "num_keep": 4},
                      "tools": [{"type": "function", "function": {"name": "f"}}],
                      "messages": [
                          {"role": "user", "content": "look", "images": ["iVBORw0KGgo="]},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"function": {"name": "f", "arguments": {"a": 1}}},
                              {"function": {"name": "g", "arguments": {}}}]},
                          {"role": "tool", "tool_name": "g", "content": "G"},
                          {"role": "tool", "content": "F"}]}, entry, stream=True)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "format", "schema": {"type": "object"}}}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "max_tokens" not in body and body["stop"] == ["x"] and body["n_keep"] == 4
    assert body["stream_options"] == {"include_usage": True} and body["tools"]
    image = body["messages"][0]["content"][1]["image_url"]["url"]
    assert image == "data:image/png;base64,iVBORw0KGgo="
    f_call, g_call = body["messages"][1]["tool_calls"]
    assert json.loads(f_call["function"]["arguments"]) == {"a": 1}
    assert body["messages"][2]["tool_call_id"] == g_call["id"]
    assert body["messages"][3]["tool_call_id"] == f_call["id"]
    assert chat_body({"messages": [], "format": "json"}, entry, False)["response_format"] == {
        "type": "json_object"}


def test_pulls_through_the_proxy_are_served_by_the_right_backend(stack_factory, ollama) -> None:
    url, store = ollama
    stack = stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start(
        "engine", "proxy", "sync")
    c = client(stack)
    for name in ("fresh:1b", "gpt-oss-mxfp4:20b"):
        assert list(c.pull(name, stream=True))[-1].status == "success"
    served = {"ms/fresh:0.2m-f32", "ms/gpt-oss-mxfp4:0.2m-f32"}
    wait(lambda: served <= {m.model for m in c.list().models})  # the sync service's work

    answer = c.chat("fresh:1b", messages=[{"role": "user", "content": "hi"}],
                    options={"num_predict": 3})
    assert answer.model == "fresh:1b" and answer.eval_count <= 3  # llama-server's answer
    assert not any(r["model"] == "fresh:1b" for r in seen_by_ollama(url))

    mxfp4 = "ms/gpt-oss-mxfp4:0.2m-f32"  # ROUTE_TO_OLLAMA: Ollama answers it
    answer = c.chat(mxfp4, messages=[{"role": "user", "content": "hi"}], stream=False)
    assert answer.message.content == "Hello from gpt-oss-mxfp4:20b"
    sent = seen_by_ollama(url)[-1]
    assert sent["model"] == "gpt-oss-mxfp4:20b" and sent["keep_alive"] == "1800s"
    assert c.show(mxfp4).template == "{{ .Prompt }}"


def test_a_stream_cut_short_raises_in_the_client(stack_factory, models_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    stack = stack_factory().start()
    slow = "ms/slow:33.8m-f32"
    parts = client(stack).chat(slow, messages=[{"role": "user", "content": "hi"}],
                               options={"num_predict": 100000, "temperature": 0},
                               stream=True)
    assert next(parts).done is False  # answering, greedily, and at length
    model_process(stack, slow).kill()
    with pytest.raises(ollama.ResponseError) as e:
        for _ in parts:
            pass
    assert slow in str(e.value) and "crashed" in str(e.value)


def test_a_missing_key_is_in_ollamas_shape_too(stack_factory) -> None:
    stack = stack_factory(API_KEY="secret").start()
    with pytest.raises(ollama.ResponseError) as e:
        client(stack).list()
    assert e.value.status_code == 401 and "x-api-key" in e.value.error
    keyed = ollama.Client(host=stack.url, headers={"Authorization": "Bearer secret"})
    assert TINY in {m.model for m in keyed.list().models}


def test_ollamas_model_while_ollama_is_down_says_so(stack_factory, tmp_path) -> None:
    url, store, proc = start_ollama(tmp_path)
    add_model(store, OWN, data=NOT_A_MODEL)
    stack = stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start()
    assert OWN in {m.model for m in client(stack).list().models}
    proc.terminate()
    proc.wait()
    with pytest.raises(ollama.ResponseError) as e:  # not "not found; did you mean <it>?"
        client(stack).chat(OWN, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and "OLLAMA_BASE" in e.value.error
