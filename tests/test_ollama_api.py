"""Ollama's native API on the proxy's port, as Ollama's own clients see it (its Python
client, its Go CLI): the engine's models (real llama-server) translated, Ollama's own passed
on to the real Ollama (tests/real_ollama.py; skipped where there is none)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import ollama
import pytest

from services.proxy.ollama.convert import Answer, Stats, Stream, chat_body
from shared.catalog import Entry
from shared.tiny_gguf import write_model
from tests.harness import free_port, http, wait
from tests.real_ollama import RealOllama
from tests.test_direct_path import model_process

TINY = "ms/tiny:0.2m-f32"
OWN = "own-mxfp4:1b"  # linked from Ollama's store, and answered by Ollama (ROUTE_TO_OLLAMA)
LINKED = "linked:1b"  # linked from Ollama's store, and answered by the engine
EMBED = "own-embed:1b"  # Ollama's embedding model
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def made(real_ollama: RealOllama) -> RealOllama:
    real_ollama.create(OWN, seed=5)
    real_ollama.create(LINKED, seed=6)
    real_ollama.create(EMBED, seed=7, pooling_type=1)
    return real_ollama


@pytest.fixture
def real(made: RealOllama) -> RealOllama:
    """The module's Ollama with nothing loaded."""
    made.unload_all()
    return made


def linked_stack(stack_factory, real: RealOllama, **env: str):
    """A stack whose sync has linked Ollama's models into the catalog."""
    stack = stack_factory(OLLAMA_BASE=real.url, OLLAMA_MODELS=str(real.store), **env).start(
        "engine", "proxy", "sync")
    wait(lambda: any(LINKED in m.get("aliases", []) for m in http(
        "GET", stack.url + "/v1/models")[1]["data"]), 30)
    return stack


@pytest.fixture
def stack(stack_factory, real):
    return linked_stack(stack_factory, real)


@pytest.fixture
def engine_stack(stack_factory):
    """The engine's models alone: these run without a real Ollama too."""
    return stack_factory().start()


def client(stack) -> ollama.Client:
    return ollama.Client(host=stack.url)


def ndjson(url: str, path: str, body: dict) -> tuple[str, list[dict]]:
    """(content type, lines) of a raw request, as a client without the SDK reads it."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.headers["Content-Type"], [json.loads(line) for line in r if line.strip()]


def test_chat_on_an_engine_model_whole_and_streamed(engine_stack) -> None:
    c = client(engine_stack)
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
    kind, lines = ndjson(engine_stack.url, "/api/chat", {"model": TINY, "messages": messages,
                                                  "options": options})
    assert kind.startswith("application/x-ndjson") and len(lines) > 1
    assert lines[-1]["done"] is True and lines[-1]["message"]["role"] == "assistant"


def test_generate_templated_and_raw(engine_stack) -> None:
    c = client(engine_stack)
    answer = c.generate(TINY, prompt="hi", system="be brief", options={"num_predict": 4})
    assert answer.done and isinstance(answer.response, str) and 0 < answer.eval_count <= 4
    raw = c.generate(TINY, prompt="<|user|>hi\n<|assistant|>", raw=True,
                     options={"num_predict": 4})
    assert raw.done and raw.eval_count > 0
    parts = list(c.generate(TINY, prompt="hi", options={"num_predict": 4}, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])


def test_list_show_ps_version_and_the_probe(stack, real) -> None:
    c = client(stack)
    listed = {m.model: m for m in c.list().models}
    assert {TINY, "ms/other:0.2m-f32", OWN, LINKED} <= set(listed)
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
    theirs = http("POST", real.url + "/api/show", {"model": OWN})[1]
    assert http("POST", stack.url + "/api/show", {"model": OWN})[1] == theirs  # passed on

    assert c.ps().models == []
    c.generate(TINY, prompt="")  # a load, as Ollama's clients preload
    running = {m.model: m for m in c.ps().models}
    assert set(running) == {TINY}
    assert running[TINY].size > 0 and running[TINY].context_length == 4096
    assert running[TINY].expires_at and running[TINY].details.family == "llama"
    c.chat(OWN, messages=HI, options={"num_predict": 2})  # Ollama loads its own
    assert {m.model for m in c.ps().models} == {TINY, OWN}

    status, body = http("GET", stack.url + "/api/version")
    theirs = http("GET", real.url + "/api/version")[1]["version"]
    assert status == 200 and body["version"] == theirs and body["model_serve"]
    status, text = http("GET", stack.url + "/")
    assert status == 200 and text == "Ollama is running"
    req = urllib.request.Request(stack.url + "/", method="HEAD")
    with urllib.request.urlopen(req) as r:
        assert r.status == 200


def test_ollamas_own_models_are_passed_on(stack, real) -> None:
    """What Ollama answers the stack's client is what it answers its own (same options)."""
    c, theirs = client(stack), ollama.Client(host=real.url)
    options = {"temperature": 0.5, "seed": 3, "num_predict": 8}
    answer = c.chat(OWN, messages=HI, stream=False, options=options)
    assert answer.model == OWN and answer.done
    direct = theirs.chat(OWN, messages=HI, stream=False, options={**options, "num_ctx": 4096})
    assert answer.message.content == direct.message.content
    parts = list(c.chat(OWN, messages=HI, stream=True, options=options))
    assert "".join(p.message.content for p in parts) == direct.message.content
    assert parts[-1].done and parts[-1].eval_count == direct.eval_count
    assert c.generate(OWN, prompt="hi", options=options).done
    embedded = c.embed(EMBED, input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError) as e:  # Ollama's own refusal, as it gave it
        c.embed(OWN, input="a")
    assert e.value.status_code == 501 and "embeddings" in e.value.error


def test_keep_alive_zero_unloads_after_the_answer(engine_stack) -> None:
    c = client(engine_stack)
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


def test_options_reach_the_engine_and_num_ctx_is_checked(engine_stack) -> None:
    c = client(engine_stack)
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


def test_a_tool_conversation_and_images_reach_the_engine(engine_stack) -> None:
    c = client(engine_stack)
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


def test_embeddings_of_an_engine_model(stack_factory, models_dir) -> None:
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    stack = stack_factory().start()
    c = client(stack)
    model = next(m.model for m in c.list().models if m.model.startswith("ms/emb"))
    assert c.show(model).capabilities == ["embedding"]
    many = c.embed(model, input=["a", "bb", "ccc"])
    assert many.model == model and len(many.embeddings) == 3
    assert all(len(v) == 64 for v in many.embeddings) and many.prompt_eval_count > 0
    assert len(c.embed(model, input="one").embeddings) == 1
    assert len(c.embeddings(model, prompt="one").embedding) == 64


def test_errors_are_in_ollamas_shape(engine_stack) -> None:
    c = client(engine_stack)
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
        got, answer = http("POST", engine_stack.url + path, body)
        assert got == status and isinstance(answer["error"], str), (path, answer)
    got, answer = http("GET", engine_stack.url + "/api/chat")
    assert got == 405 and isinstance(answer["error"], str)


def test_model_management_goes_to_ollama(stack, real) -> None:
    c = client(stack)
    assert c.copy(OWN, "copied:1b").status == "success"
    assert c.create("made-mxfp4:1b", from_=OWN, parameters={"temperature": 0.1}).status == \
        "success"
    for name in ("copied:1b", "made-mxfp4:1b"):
        assert name in {m.model for m in c.list().models}
        assert c.chat(name, messages=HI, options={"num_predict": 2}, keep_alive=0).done
        c.delete(name)
        wait(lambda n=name: n not in {m.model for m in c.list().models})  # the sync's work
    assert "copied:1b" not in real.cli("list").stdout
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("copied:1b")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:  # Ollama cannot reach its registry here
        c.pull("missing-model:1b")
    assert "pull model manifest" in e.value.error


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


def test_models_made_through_the_proxy_are_served_by_the_right_backend(
        stack, real, tmp_path) -> None:
    """A client uploads a GGUF file and creates a model of it through the proxy (as with
    Ollama itself); the sync service links it, and the engine or Ollama answers it."""
    c = client(stack)
    for name, seed in (("fresh:1b", 20), ("gpt-oss-mxfp4:20b", 21)):
        gguf = write_model(tmp_path / f"{seed}.gguf", name=name.split(":")[0], seed=seed,
                           ascii_only=True)
        digest = c.create_blob(gguf)
        assert c.create(name, files={"model.gguf": digest}).status == "success"
    aliases = lambda: {a for m in http("GET", stack.url + "/v1/models")[1]["data"]  # noqa: E731
                       for a in m["aliases"]}
    wait(lambda: {"fresh:1b", "gpt-oss-mxfp4:20b"} <= aliases(), 30)  # the sync's work

    answer = c.chat("fresh:1b", messages=HI, options={"num_predict": 3})
    assert answer.model == "fresh:1b" and answer.eval_count <= 3
    assert "fresh:1b" not in real.loaded()  # llama-server answered it, not Ollama
    mxfp4 = next(m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]
                 if "gpt-oss-mxfp4:20b" in m["aliases"])  # ROUTE_TO_OLLAMA: Ollama answers it
    answer = c.chat(mxfp4, messages=HI, stream=False, options={"num_predict": 3})
    assert answer.model == mxfp4 and answer.done
    assert 1700 < expires_in(real.loaded()["gpt-oss-mxfp4:20b"]) <= 1800  # the model's TTL
    assert c.show(mxfp4) == ollama.Client(host=real.url).show("gpt-oss-mxfp4:20b")


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
    gone = RealOllama.start(tmp_path / "going")
    try:
        gone.create(OWN)
        stack = stack_factory(OLLAMA_BASE=gone.url).start()  # its store is not linked
        assert OWN in {m.model for m in client(stack).list().models}
    finally:
        gone.stop()
    with pytest.raises(ollama.ResponseError) as e:  # not "not found; did you mean <it>?"
        client(stack).chat(OWN, messages=HI)
    assert e.value.status_code == 503 and "OLLAMA_BASE" in e.value.error


def expires_in(row: dict) -> float:
    """Seconds until an /api/ps row's expires_at (Ollama writes nanoseconds)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", row["expires_at"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp() - datetime.now(UTC).timestamp()


def test_tags_keep_ollamas_rows_and_list_each_file_once(stack, real) -> None:
    """Ollama's rows as Ollama gives them (name, digest, size, capabilities: what `ollama
    list` shows), and no second row under the catalog's id for a file linked from it."""
    theirs = {m["name"]: m for m in http("GET", real.url + "/api/tags")[1]["models"]}
    ours = http("GET", stack.url + "/api/tags")[1]["models"]
    # by name: Ollama's order of models made in the same second changes from call to call
    assert {m["name"]: m for m in ours if m["name"] in theirs} == theirs
    served = http("GET", stack.url + "/v1/models")[1]["data"]
    linked = {m["id"] for m in served if any(a in theirs for a in m["aliases"])}
    assert len(linked) >= 3 and not linked & {m["name"] for m in ours}
    names = [m["name"] for m in ours]
    assert len(names) == len(set(names)) and TINY in names
    tiny = next(m for m in ours if m["name"] == TINY)  # an engine row, in 0.33's shape
    assert (tiny["details"]["context_length"], tiny["details"]["embedding_length"]) == (
        4096, 64)


def go_cli(real: RealOllama, stack, *args: str) -> subprocess.CompletedProcess:
    """Ollama's own CLI pointed at the stack."""
    env = {**real.env, "OLLAMA_HOST": stack.url.removeprefix("http://")}
    return subprocess.run([str(real.exe), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_ollamas_go_cli_shows_and_lists_through_the_stack(stack, real) -> None:
    """`ollama show` sends {"model": "", "name": ...}: Ollama falls back to the name."""
    for name, says in ((OWN, "completion"), (EMBED, "embedding"), (LINKED, "num_ctx"),
                       (TINY, "num_ctx")):
        shown = go_cli(real, stack, "show", name)
        assert shown.returncode == 0 and "llama" in shown.stdout, (name, shown.stderr)
        assert says in shown.stdout, (name, shown.stdout)
    status, body = http("POST", stack.url + "/api/show", {"model": "", "name": OWN})
    assert status == 200 and body == http("POST", real.url + "/api/show", {"model": OWN})[1]
    listed = go_cli(real, stack, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]
            if line.strip()}
    digests = {m["name"]: m["digest"][:12] for m in http("GET", real.url + "/api/tags")[1][
        "models"]}
    assert {n: rows[n] for n in digests} == digests  # the IDs Ollama's own list shows
    assert TINY in rows and not any(n.startswith("ms/") and "linked" in n for n in rows)
