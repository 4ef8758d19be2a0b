"""Ollama's models served in place, against the real Ollama (tests/real_ollama.py; the test
skips where there is none): `ollama create` → bridge → sync → answered by the engine's
llama-server, or by Ollama itself (ROUTE_TO_OLLAMA, EMBEDDINGS_TO_OLLAMA, the models only Ollama
has). What is checked is what a user sees: the answers, Ollama's /api/ps, its log, its
processes. A pull needs the internet, so `model pull`'s progress is shown by the stand-in."""

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.proxy.ollama.chat import ChatStream, chat_response
from shared.os_memory import memory_of_ollama_runners
from shared.tiny_gguf import write_model
from tests import tiny_gptoss
from tests.harness import free_port, http, wait
from tests.real_ollama import RealOllama
from tests.streams import chat, stream_chat

CHAT, EMBED, MXFP4 = "tinychat:latest", "tiny-embed:latest", "tiny-mxfp4:20b"
CUT = "bytes-mxfp4:1b"  # its words are single bytes: much of what it writes is no UTF-8
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def made(real_ollama: RealOllama) -> RealOllama:
    real_ollama.create(CHAT, seed=1)
    real_ollama.create(EMBED, seed=2, pooling_type=1)
    real_ollama.create(MXFP4, seed=3)
    real_ollama.create(CUT, seed=4, ascii_only=False)
    return real_ollama


@pytest.fixture
def real(made: RealOllama) -> RealOllama:
    """The module's Ollama with nothing loaded: each test's first request finds it cold."""
    made.unload_all()
    return made


def serving(stack_factory, real: RealOllama, *services: str, **env: str):
    """A stack beside the real Ollama, once its sync has linked Ollama's models."""
    stack = stack_factory(OLLAMA_BASE=real.url, OLLAMA_MODELS=str(real.store), **env).start(
        *(services or ("engine", "proxy", "sync")))
    wait(lambda: any(MXFP4 in m["aliases"] for m in models(stack).values()), 30)
    return stack


@pytest.fixture
def stack(stack_factory, real):
    return serving(stack_factory, real)


def models(stack) -> dict[str, dict]:
    return {m["id"]: m for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def served_id(stack, ollama_name: str) -> str:
    return next(mid for mid, m in models(stack).items() if ollama_name in m["aliases"])


def running(stack) -> dict[str, dict]:
    return {r["id"]: r for r in http("GET", stack.url + "/running")[1]["models"]}


def unload(stack, name: str) -> None:
    assert http("POST", stack.url + "/models/unload", {"model": name})[0] == 200
    wait(lambda: not running(stack), 30)


def expires_in(row: dict) -> float:
    """Seconds until an /api/ps row's expires_at (Ollama writes nanoseconds)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", row["expires_at"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp() - datetime.now(UTC).timestamp()


def test_a_cold_embedding_model_answers_every_embeddings_route(stack, real) -> None:
    """Ollama refuses an empty /api/generate for an embedding model: loaded that way, every
    embeddings request for a cold one was a 400."""
    starts = real.runner_starts()
    for given, count in ((["a", "b"], 2), ("hello", 1)):
        status, body = http("POST", stack.url + "/v1/embeddings",
                            {"model": "tiny-embed", "input": given})
        assert status == 200, body
        assert body["object"] == "list" and body["model"] == "tiny-embed"
        assert [d["index"] for d in body["data"]] == list(range(count))
        assert all(len(d["embedding"]) == 64 for d in body["data"])
    assert real.runner_starts() == starts + 1  # loaded once, at the context asked for after
    for path, body, field, count in (
            ("/api/embed", {"model": "tiny-embed", "input": ["a", "b"]}, "embeddings", 2),
            ("/api/embeddings", {"model": "tiny-embed", "prompt": "a"}, "embedding", 64)):
        unload(stack, "tiny-embed")
        status, answer = http("POST", stack.url + path, body)
        assert status == 200 and len(answer[field]) == count, (path, answer)
    assert real.runner_starts() == starts + 3


def test_a_cold_chat_starts_ollamas_runner_once_at_the_models_context(
        stack_factory, real, config_dir) -> None:
    """The load carries the context the requests ask for: one at another context would make
    Ollama start a second runner for the first request, outside admission."""
    (config_dir / "custom_models.yaml").write_text(f"models:\n  {MXFP4}:\n    ctx_size: 1024\n")
    stack = serving(stack_factory, real, "engine", "proxy", "governor", "sync")
    starts = real.runner_starts()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(MXFP4))
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert real.runner_starts() == starts + 1, real.log_text()[-3000:]
    assert real.loaded()[MXFP4]["context_length"] == 1024
    # Ollama's own API, passed on, and a stream keep to it too
    for path, extra in (("/api/chat", {"messages": HI}), ("/api/generate", {"prompt": "hi"})):
        status, answer = http("POST", stack.url + path, {
            "model": MXFP4, "stream": False, "options": {"num_predict": 2}, **extra})
        assert status == 200 and answer["done"], answer
    assert stream_chat(stack.url, MXFP4, 4)
    assert real.runner_starts() == starts + 1
    assert [r["context_length"] for r in running(stack).values()] == [1024]


def test_ollamas_runner_is_measured_from_its_own_process(stack, real) -> None:
    """0.33 runs each model as a llama-server child of `ollama serve`: found there by the
    blob it serves (never the engine's llama-server serving the same blob), and measured."""
    tiny = served_id(stack, CHAT)  # the engine serves this one, from Ollama's blob
    assert http("POST", stack.url + "/v1/chat/completions", chat(tiny))[0] == 200
    blob = str(next((stack.root / "models" / "ollama").rglob("tinychat*.gguf")).resolve())
    assert memory_of_ollama_runners({tiny: blob}) == {}  # the engine's process is not Ollama's
    assert http("POST", stack.url + "/v1/chat/completions", chat(MXFP4))[0] == 200
    [runner] = real.runners()
    pss = runner.memory_full_info().pss
    measured = running(stack)[served_id(stack, MXFP4)]["memory"]["measured"]
    print(f"measured {measured / 2**20:.1f} MiB, the runner's PSS {pss / 2**20:.1f} MiB")
    assert abs(measured - pss) <= 0.35 * pss


def test_an_answer_ollama_cut_short_is_an_error(stack) -> None:
    """Ollama drops text that is not valid UTF-8 and ends the answer with `done: false`."""
    asked = chat(CUT, max_tokens=16, temperature=0)
    status, body = http("POST", stack.url + "/v1/chat/completions", asked)
    assert status == 502, body
    assert body["error"]["code"] == "ollama_error" and "done: false" in body["error"]["message"]
    req = urllib.request.Request(stack.url + "/v1/chat/completions", data=json.dumps(
        {**asked, "stream": True}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert "[DONE]" not in events and "error" in json.loads(events[-1])


def test_a_gpt_oss_answer_ollama_cannot_read_is_an_error_naming_its_reason(stack, real) -> None:
    """Ollama parses GPT-OSS's Harmony itself; what random weights write is no Harmony, and
    the client gets Ollama's reason in an OpenAI-shaped error (the shape of a readable one,
    thinking included, is checked on Ollama's lines below)."""
    name = "gpt-oss-think-mxfp4:20b"
    (real.root / "Modelfile.gptoss").write_text(f"FROM {tiny_gptoss.cached_model()}\n")
    assert real.cli("create", name, "-f", str(real.root / "Modelfile.gptoss")).returncode == 0
    wait_for(lambda: any(name in m["aliases"] for m in models(stack).values()), 30)
    for stream in (False, True):
        status, body = http("POST", stack.url + "/v1/chat/completions",
                            chat(name, 30, stream=stream))
        assert status == 502 and body["error"]["code"] == "ollama_error", body
        assert "does not match the expected" in body["error"]["message"]


def test_mxfp4_models_are_answered_by_ollama_with_samplers_intact(stack_factory, real,
                                                                  config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {MXFP4}:\n    sampler_args: --temp 0.7 --top-k 40\n"
        "    ttl: 600\n    ctx_size: 2048\n")
    stack = serving(stack_factory, real)
    sid = served_id(stack, MXFP4)
    assert models(stack)[sid]["backend"] == "ollama"
    samplers = {"top_p": 0.9, "min_p": 0.05, "seed": 7, "stop": "END"}
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(sid, 12, **samplers))
    assert status == 200, body
    assert body["model"] == sid and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    # Ollama itself, given those samplers with the preset's, answers the same: none was lost
    options = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "seed": 7,
               "stop": ["END"], "num_predict": 12, "num_ctx": 2048}
    direct = http("POST", real.url + "/api/chat", {"model": MXFP4, "messages": HI,
                                                   "stream": False, "options": options})[1]
    assert body["choices"][0]["message"]["content"] == direct["message"]["content"]
    other = http("POST", real.url + "/api/chat", {"model": MXFP4, "messages": HI,
                                                  "stream": False,
                                                  "options": {**options, "seed": 8}})[1]
    assert other["message"]["content"] != direct["message"]["content"]  # the seed tells
    row = real.loaded()[MXFP4]
    assert row["context_length"] == 2048 and 560 < expires_in(row) <= 600  # ttl: keep_alive


def test_a_sampler_ollama_lacks_is_dropped_with_a_warning(stack) -> None:
    body = json.dumps(chat(MXFP4, top_n_sigma=1.5)).encode()
    req = urllib.request.Request(stack.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 200
        assert "top_n_sigma" in r.headers["X-Model-Serve-Warning"]


def test_ollama_only_models_are_listed_and_answered(stack_factory, real, tmp_path) -> None:
    """A model Ollama has and the catalog does not (here: its store is not the one the
    bridge reads) is listed and answered by Ollama."""
    stack = stack_factory(OLLAMA_BASE=real.url, OLLAMA_MODELS=str(tmp_path / "elsewhere"))
    stack.start()
    entry = models(stack)[CHAT]
    assert entry["backend"] == "ollama"
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(CHAT))
    assert status == 200 and body["model"] == CHAT and "timings" not in body
    assert CHAT in real.loaded()


def test_a_model_made_with_ollama_itself_is_served_within_two_seconds(stack, real) -> None:
    start = time.monotonic()
    real.create("fresh:1b", seed=9)
    made = time.monotonic() - start
    seen = wait_for(lambda: any("fresh:1b" in m["aliases"] for m in models(stack).values()))
    print(f"created in {made:.2f}s, then requestable after {seen:.2f}s")
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("fresh:1b"))
    assert status == 200 and "timings" in body  # llama-server answered, not Ollama
    assert seen < 2


def wait_for(check, timeout: float = 10) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_bad_manifest_is_logged_and_serving_goes_on(stack, real) -> None:
    bad = real.store / "manifests/registry.ollama.ai/library/bad/latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{oops")
    try:
        time.sleep(1)
        assert http("POST", stack.url + "/v1/chat/completions", chat(CHAT))[0] == 200
        assert "bad:latest: unreadable manifest" in (stack.root / "sync.log").read_text()
        assert stack.procs[2].poll() is None  # the sync service still runs
    finally:
        bad.unlink()
        bad.parent.rmdir()


def test_removing_a_model_takes_it_out_of_service(stack, real, models_dir) -> None:
    real.create("gone:1b", seed=10)
    wait_for(lambda: any("gone:1b" in m["aliases"] for m in models(stack).values()))
    sid = served_id(stack, "gone:1b")
    assert http("POST", stack.url + "/v1/chat/completions", chat("gone:1b"))[0] == 200
    [link] = (models_dir / "ollama" / "gone").iterdir()
    mine = models_dir / "ollama" / "hand-made.gguf"
    mine.write_bytes(b"my own file, not a model")
    listed = stack.cli("list", "gone")
    assert listed.returncode == 0 and "gone:1b" in listed.stdout
    result = stack.cli("rm", "gone:1b", "--yes")
    assert result.returncode == 0 and "removed gone:1b" in result.stdout, result.stderr
    assert sid not in models(stack) and not link.is_symlink()
    assert "gone:1b" not in real.cli("list").stdout
    assert mine.read_bytes() == b"my own file, not a model"
    assert http("POST", stack.url + "/v1/chat/completions", chat("gone:1b"))[0] == 404


def test_an_empty_ollama_is_said_plainly(stack_factory, tmp_path) -> None:
    empty = RealOllama.start(tmp_path / "empty-ollama")
    try:
        stack = stack_factory(OLLAMA_BASE=empty.url, OLLAMA_MODELS=str(empty.store))
        result = stack.cli("list")
        assert result.returncode == 0 and "Ollama has no models" in result.stdout
    finally:
        empty.stop()


def test_cli_names_nothing_and_bad_usage_exit_non_zero(stack) -> None:
    assert stack.cli("rm", "nothing:here", "--yes").returncode == 1
    assert "no Ollama model matches" in stack.cli("rm", "nothing:here", "--yes").stderr
    assert stack.cli("show", "ms/tiny").returncode == 1
    assert stack.cli("rm").returncode == 2
    offline = stack.cli("pull", "missing:1b")  # Ollama cannot reach its registry here
    assert offline.returncode == 1 and "pull model manifest" in offline.stderr


def test_model_run_chats_through_the_proxy(stack) -> None:
    result = stack.cli("run", MXFP4, input="hi there\nand again\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>>") == 3 and len(result.stdout) > 20
    result = stack.cli("run", "no-such-model", input="hi\n")
    assert result.returncode == 1 and "no model named 'no-such-model'" in result.stderr
    assert ">>>" not in result.stdout  # said before the prompt, not after the first message


def test_hugging_face_names_are_served_under_the_name_made(stack, real, models_dir) -> None:
    name = "hf.co/someone/Tiny-GGUF:Q8_0"
    real.create(name, seed=11)
    wait_for(lambda: any(name in m["aliases"] for m in models(stack).values()))
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(name))
    assert status == 200 and body["model"] == name and "timings" in body
    assert (models_dir / "ollama" / "Tiny-GGUF").is_dir()


def test_ollamas_thinking_and_tool_calls_become_openai_chunks() -> None:
    """The tiny models neither think nor call tools: the translation is checked on lines
    shaped as Ollama 0.33 streams them."""
    def line(**message) -> dict:
        return {"model": MXFP4, "message": {"role": "assistant", "content": "", **message},
                "done": False}

    calls = [{"id": f"call_{i}", "function": {"index": i, "name": "get_weather",
                                              "arguments": {"city": city}}}
             for i, city in enumerate(("Paris", "Rome"))]
    last = {"model": MXFP4, "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 30}
    stream = ChatStream(MXFP4)
    raw = b"".join(stream.feed(item) for item in (
        line(thinking="Let me "), line(thinking="think."), line(tool_calls=calls[:1]),
        line(tool_calls=calls[1:]), last))
    events = [json.loads(x[6:]) for x in raw.decode().split("\n\n")
              if x.startswith("data: {")]
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant" and sum("role" in d for d in deltas) == 1
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    streamed = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["id"]) for c in streamed] == [(0, "call_0"), (1, "call_1")]
    assert [json.loads(c["function"]["arguments"]) for c in streamed] == [
        {"city": "Paris"}, {"city": "Rome"}]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 30,
                                   "total_tokens": 42}
    whole = chat_response({**last, "message": {"role": "assistant", "content": "",
                                               "thinking": "Let me think.",
                                               "tool_calls": calls}}, MXFP4)
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "Let me think."
    assert [c["id"] for c in message["tool_calls"]] == ["call_0", "call_1"]


@pytest.fixture
def standin_stack(stack_factory, ollama):
    url, store = ollama
    return stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start(
        "engine", "proxy", "sync")


def test_model_pull_shows_progress_then_the_engine_serves_it(standin_stack) -> None:
    """Ollama pulls from its registry, which these machines cannot reach: the stand-in
    pulls a generated model, streaming its progress as Ollama does."""
    stack = standin_stack
    result = stack.cli("pull", "qwen-tiny:1b")
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stdout and "success" in result.stdout
    # the sync service may have seen the new manifest first; either way it is served now
    assert "models; engine config" in result.stdout
    served = models(stack)
    sid = "ms/qwen-tiny:0.2m-f32"
    assert served[sid]["backend"] == "engine" and "qwen-tiny:1b" in served[sid]["aliases"]
    for name in (sid, "qwen-tiny:1b"):  # the Ollama name works as it was pulled
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(name))
        assert status == 200 and body["model"] == name, body
        assert "timings" in body  # llama-server answered, not Ollama
    names = stack.cli("names")
    assert "qwen-tiny:1b" in names.stdout and sid in names.stdout
    config = stack.cli("list", "--config", "qwen")
    assert sid in config.stdout and "4096" in config.stdout
    shown = stack.cli("show", "qwen-tiny:1b")
    assert shown.returncode == 0 and f"id               {sid}" in shown.stdout
    assert "aliases          qwen-tiny:1b" in shown.stdout
    assert "--ctx-size 4096" in shown.stdout  # as the engine runs it


def test_ollama_down_is_503_naming_ollama_base(stack_factory, models_dir) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    stack = stack_factory(OLLAMA_BASE=base, OLLAMA_MODELS=str(Path(models_dir).parent / "o"))
    (Path(stack.env["CONFIG_DIR"]) / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    backend: ollama\n    ollama_model: tiny:1b\n")
    stack.start()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("ms/tiny:0.2m-f32"))
    assert status == 503 and base in body["error"]["message"]
    assert "OLLAMA_BASE" in body["error"]["message"]
    for args in (("pull", "x:1b"), ("rm", "x:1b", "--yes")):
        result = stack.cli(*args)
        assert result.returncode == 1 and base in result.stderr
    listed = stack.cli("list")  # the served models, and Ollama's absence as a note
    assert listed.returncode == 0 and base in listed.stderr and "ms/tiny:0.2m-f32" in \
        listed.stdout


def test_model_run_with_the_proxy_down_says_so(stack_factory) -> None:
    result = stack_factory().cli("run", "ms/tiny:0.2m-f32", input="hi\n")
    assert result.returncode == 1 and "not answering" in result.stderr


def test_a_models_folder_created_after_the_start_is_watched(stack_factory, tmp_path) -> None:
    later = tmp_path / "later" / "models"  # neither exists at the start
    stack = stack_factory(MODELS_DIR=str(later)).start("engine", "proxy", "sync")
    assert "ms/late:0.2m-f32" not in models(stack)  # (the demo model stands in meanwhile)
    for i in range(20):  # what else happens beside it sets off nothing
        (tmp_path / f"noise-{i}").write_text("x")
    write_model(later / "pub" / "late-GGUF" / "late-F32.gguf", name="late")
    wait_for(lambda: "ms/late:0.2m-f32" in models(stack), 30)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("ms/late:0.2m-f32"))
    assert status == 200, (body, stack.logs())
    write_model(later / "pub" / "later-GGUF" / "later-F32.gguf", name="later", seed=2)
    wait_for(lambda: "ms/later:0.2m-f32" in models(stack), 30)  # and watched within
    log = (stack.root / "sync.log").read_text()
    assert f"{later} does not exist (yet); watching for it" in log
    assert log.count("synced in") <= 4  # the start, the folder, each model: not the noise


def test_a_model_is_in_the_proxys_catalog_only_once_the_engine_serves_it(
        stack_factory, models_dir) -> None:
    """The sync writes the proxy's catalog after the engine took up its config: a request
    made the moment a new model is listed never reaches an engine that lacks it."""
    stack = stack_factory().start("engine", "proxy", "sync")
    catalog = stack.state_dir / "catalog.json"
    wait_for(lambda: catalog.exists() and "ms/tiny:0.2m-f32" in catalog.read_text(), 30)
    write_model(models_dir / "pub" / "new-GGUF" / "new-F32.gguf", name="new")
    deadline = time.monotonic() + 30
    while "ms/new:0.2m-f32" not in catalog.read_text(errors="replace"):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    _, listed = http("GET", stack.engine_url + "/models", headers=stack.engine_headers)
    assert "ms_new_0.2m-f32" in {m["id"] for m in listed["data"]}, listed


def test_a_watched_folder_removed_and_made_again_is_watched_again(stack_factory,
                                                                   tmp_path) -> None:
    """As Ollama does with its manifests folder: removed once emptied, made again later."""
    folder = tmp_path / "again" / "models"
    write_model(folder / "pub" / "first-GGUF" / "first-F32.gguf", name="first")
    stack = stack_factory(MODELS_DIR=str(folder)).start("engine", "proxy", "sync")
    wait_for(lambda: "ms/first:0.2m-f32" in models(stack), 30)
    shutil.rmtree(folder)
    wait_for(lambda: "ms/first:0.2m-f32" not in models(stack), 30)
    write_model(folder / "pub" / "second-GGUF" / "second-F32.gguf", name="second")
    wait_for(lambda: "ms/second:0.2m-f32" in models(stack), 30)
    write_model(folder / "pub" / "third-GGUF" / "third-F32.gguf", name="third", seed=3)
    wait_for(lambda: "ms/third:0.2m-f32" in models(stack), 30)  # watched, not just seen once
    assert f"{folder} was removed; watching for it again" in \
        (stack.root / "sync.log").read_text()
