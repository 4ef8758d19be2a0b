"""Ollama's models served in place: pull → bridge → sync → answered, and routing to Ollama.
Ollama is the stand-in (real on-disk store); llama-server is real."""

import json
import time
import urllib.request
from pathlib import Path

import pytest

from shared.tiny_gguf import write_model
from tests.harness import free_port, http
from tests.streams import chat, stream_chat


@pytest.fixture
def stack(stack_factory, ollama):
    url, store = ollama
    return stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start(
        "engine", "proxy", "sync")


def models(stack) -> dict[str, dict]:
    return {m["id"]: m for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def wait_for(check, timeout: float = 10) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_pull_serves_from_the_real_engine_then_rm_removes(stack, models_dir) -> None:
    mine = models_dir / "ollama" / "hand-made.gguf"
    mine.write_bytes(b"my own file, not a model")
    result = stack.cli("pull", "qwen-tiny:1b")
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stdout and "success" in result.stdout
    # the sync service may have seen the new manifest first; either way it is served now
    assert "models; engine config" in result.stdout

    served = models(stack)
    sid = "ms/qwen-tiny:0.2m-f32"
    assert served[sid]["backend"] == "engine" and "qwen-tiny:1b" in served[sid]["aliases"]
    link = models_dir / "ollama" / "qwen-tiny" / "qwen-tiny-164.54K-F32.gguf"
    assert link.is_symlink()
    for name in (sid, "qwen-tiny:1b"):  # the Ollama name works as it was pulled
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(name))
        assert status == 200 and body["model"] == name, body
        assert "timings" in body  # llama-server answered, not Ollama
    assert models(stack)[sid]["status"] == "loaded"

    names = stack.cli("names")
    assert "qwen-tiny:1b" in names.stdout and sid in names.stdout
    listed = stack.cli("list", "qwen")
    assert listed.returncode == 0 and "qwen-tiny:1b" in listed.stdout
    config = stack.cli("list", "--config", "qwen")
    assert sid in config.stdout and "4096" in config.stdout
    shown = stack.cli("show", "qwen-tiny:1b")
    assert shown.returncode == 0 and f"id               {sid}" in shown.stdout
    assert "aliases          qwen-tiny:1b" in shown.stdout
    assert "--ctx-size 4096" in shown.stdout  # as the engine runs it

    result = stack.cli("rm", "qwen-tiny:1b", "--yes")
    assert result.returncode == 0 and "removed qwen-tiny:1b" in result.stdout, result.stderr
    assert sid not in models(stack) and not link.is_symlink()
    assert mine.read_bytes() == b"my own file, not a model"
    error = http("POST", stack.url + "/v1/chat/completions", chat("qwen-tiny:1b"))
    assert error[0] == 404


def test_a_pull_made_with_ollama_itself_is_served_within_two_seconds(stack, ollama) -> None:
    url, _ = ollama
    start = time.monotonic()
    req = urllib.request.Request(url + "/api/pull", data=json.dumps(
        {"model": "fresh:1b"}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        r.read()
    pulled = time.monotonic() - start
    seen = wait_for(lambda: "ms/fresh:0.2m-f32" in models(stack))
    print(f"pull {pulled:.2f}s, then requestable after {seen:.2f}s")
    assert http("POST", stack.url + "/v1/chat/completions", chat("fresh:1b"))[0] == 200
    assert seen < 2


def test_a_bad_manifest_is_logged_and_serving_goes_on(stack, ollama) -> None:
    _, store = ollama
    assert stack.cli("pull", "good:1b").returncode == 0
    bad = store / "manifests/registry.ollama.ai/library/bad/latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{oops")
    time.sleep(1)
    assert "ms/good:0.2m-f32" in models(stack)
    assert http("POST", stack.url + "/v1/chat/completions", chat("good:1b"))[0] == 200
    assert "bad:latest: unreadable manifest" in (stack.root / "sync.log").read_text()
    assert stack.procs[2].poll() is None  # the sync service still runs


def requests_seen(ollama_url: str) -> list[dict]:
    return http("GET", ollama_url + "/_standin/requests")[1]


def test_mxfp4_models_are_answered_by_ollama_with_samplers_intact(stack, ollama,
                                                                  config_dir) -> None:
    url, _ = ollama
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  gpt-oss-mxfp4:0.2m-f32:\n    sampler_args: --temp 0.7 --top-k 40\n"
        "    ttl: 600\n    ctx_size: 2048\n")
    assert stack.cli("pull", "gpt-oss-mxfp4:20b").returncode == 0
    sid = "ms/gpt-oss-mxfp4:0.2m-f32"
    assert models(stack)[sid]["backend"] == "ollama"
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(
        sid, max_tokens=50, top_p=0.9, min_p=0.05, seed=7, stop="END"))
    assert status == 200, body
    assert body["model"] == sid and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("Hello from gpt-oss-mxfp4:20b")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 7
    sent = requests_seen(url)[-1]
    assert sent["model"] == "gpt-oss-mxfp4:20b" and sent["keep_alive"] == "600s"
    assert sent["options"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                               "seed": 7, "stop": ["END"], "num_predict": 50, "num_ctx": 2048}


def test_ollama_streams_become_openai_chunks_with_tool_calls(stack, ollama) -> None:
    assert stack.cli("pull", "think-mxfp4:1b").returncode == 0
    sid = "ms/think-mxfp4:0.2m-f32"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    events = stream_chat(stack.url, sid, 20, tools=tools,
                         messages=[{"role": "user", "content": "weather in two cities?"}])
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant" and sum("role" in d for d in deltas) == 1
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"}, {"city": "Rome"}]
    assert all(c["function"]["name"] == "get_weather" and c["id"] for c in calls)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"]["total_tokens"] > 0

    status, body = http("POST", stack.url + "/v1/chat/completions", chat(
        sid, tools=tools, messages=[{"role": "user", "content": "weather?"}]))
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "Let me think."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_a_sampler_ollama_lacks_is_dropped_with_a_warning(stack) -> None:
    assert stack.cli("pull", "w-mxfp4:1b").returncode == 0
    body = json.dumps(chat("w-mxfp4:1b", top_n_sigma=1.5)).encode()
    req = urllib.request.Request(stack.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 200
        assert "top_n_sigma" in r.headers["X-Model-Serve-Warning"]


def test_embeddings_go_to_ollama_single_and_batch(stack, ollama) -> None:
    url, _ = ollama
    assert stack.cli("pull", "nomic-embed-text:latest").returncode == 0
    for given, count in (("hello", 1), (["a", "b", "c"], 3)):
        status, body = http("POST", stack.url + "/v1/embeddings",
                            {"model": "nomic-embed-text", "input": given})
        assert status == 200, body
        assert body["object"] == "list" and body["model"] == "nomic-embed-text"
        assert [d["index"] for d in body["data"]] == list(range(count))
        assert all(len(d["embedding"]) == 8 for d in body["data"])
    assert requests_seen(url)[-1]["path"] == "/api/embed"


def test_ollama_only_models_are_listed_and_answered(stack, ollama) -> None:
    url, _ = ollama
    req = urllib.request.Request(url + "/api/pull", data=b'{"model": "mlx-safetensors:1b"}')
    with urllib.request.urlopen(req) as r:
        r.read()
    wait_for(lambda: "mlx-safetensors:1b" in models(stack))
    entry = models(stack)["mlx-safetensors:1b"]
    assert entry["backend"] == "ollama"
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("mlx-safetensors:1b"))
    assert status == 200 and body["model"] == "mlx-safetensors:1b"


def test_ollama_down_is_503_naming_ollama_base(stack_factory, models_dir) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    stack = stack_factory(OLLAMA_BASE=base, OLLAMA_MODELS=str(Path(models_dir).parent / "o"))
    (Path(stack.env["CONFIG_DIR"]) / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    backend: ollama\n    ollama_model: tiny:1b\n")
    stack.start()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("ms/tiny:0.2m-f32"))
    assert status == 503 and base in body["error"]["message"]
    assert "OLLAMA_BASE" in body["error"]["message"]
    for args in (("list",), ("pull", "x:1b"), ("rm", "x:1b", "--yes")):
        result = stack.cli(*args)
        assert result.returncode == 1 and base in result.stderr


def test_an_empty_ollama_is_said_plainly(stack) -> None:
    result = stack.cli("list")
    assert result.returncode == 0 and "Ollama has no models" in result.stdout


def test_cli_names_nothing_and_bad_usage_exit_non_zero(stack) -> None:
    assert stack.cli("rm", "nothing:here", "--yes").returncode == 1
    assert "no Ollama model matches" in stack.cli("rm", "nothing:here", "--yes").stderr
    assert stack.cli("show", "ms/tiny").returncode == 1
    assert stack.cli("rm").returncode == 2
    assert stack.cli("pull", "missing:1b").returncode == 1


def test_model_run_chats_through_the_proxy(stack) -> None:
    assert stack.cli("pull", "chat-mxfp4:1b").returncode == 0
    result = stack.cli("run", "chat-mxfp4:1b", input="hi there\nand again\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Hello from chat-mxfp4:1b") == 2
    result = stack.cli("run", "no-such-model", input="hi\n")
    assert result.returncode == 1 and "no model named 'no-such-model'" in result.stderr
    assert ">>>" not in result.stdout  # said before the prompt, not after the first message


def test_hugging_face_pulls_are_served_under_the_name_pulled(stack, models_dir) -> None:
    name = "hf.co/someone/Tiny-GGUF:Q8_0"
    assert stack.cli("pull", name).returncode == 0
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(name))
    assert status == 200 and body["model"] == name and "timings" in body
    assert (models_dir / "ollama" / "Tiny-GGUF").is_dir()


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
    assert http("POST", stack.url + "/v1/chat/completions", chat("ms/late:0.2m-f32"))[0] == 200
    write_model(later / "pub" / "later-GGUF" / "later-F32.gguf", name="later", seed=2)
    wait_for(lambda: "ms/later:0.2m-f32" in models(stack), 30)  # and watched within
    log = (stack.root / "sync.log").read_text()
    assert f"{later} does not exist (yet); watching for it" in log
    assert log.count("synced in") <= 4  # the start, the folder, each model: not the noise
