"""Ollama's `truncate` on the proxy's Ollama API for the engine's models (real llama-server,
a small context): a prompt longer than the context is cut as Ollama cuts it, instead of
llama-server's 400; `truncate: false` gets Ollama's refusal. Through Ollama's Python client
where it can say it, else raw requests."""

from __future__ import annotations

import json
import urllib.request

import ollama
import pytest

from shared.tiny_gguf import write_model
from tests.harness import http

TINY = "ms/tiny:0.2m-f32"
EMB = "ms/emb:0.2m-f32"
CTX = 512
WARNING = "X-Model-Serve-Warning"
OPTIONS = {"num_predict": 8, "temperature": 0, "seed": 1}
SYSTEM = {"role": "system", "content": "You are the keeper of the lighthouse."}


@pytest.fixture
def stack(stack_factory, models_dir, config_dir):
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  tiny:0.2m-f32:\n    ctx_size: {CTX}\n    parallel: 1\n"
        f"  emb:0.2m-f32:\n    ctx_size: {CTX}\n    parallel: 1\n")
    return stack_factory().start()


def post(url: str, path: str, body: dict) -> tuple[int, dict, list[dict]]:
    """(status, headers, NDJSON lines) of a raw request."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), [json.loads(x) for x in r if x.strip()]
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), [json.loads(e.read())]


def tokens(url: str, text: str) -> int:
    return len(http("POST", url + "/tokenize", {"model": TINY, "content": text})[1]["tokens"])


def long_chat(url: str) -> list[dict]:
    """A system message, then turns that together take about twice the context."""
    turn = "The lamp was trimmed and the log was written before the tide came in. " * 2
    per = tokens(url, turn)
    n = 2 * CTX // per + 2
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: {turn}"}
             for i in range(n)]
    return [SYSTEM, *turns, {"role": "user", "content": "Is the lamp lit?"}]


def test_a_chat_longer_than_the_context_keeps_its_system_and_latest_messages(stack) -> None:
    c = ollama.Client(host=stack.url)
    messages = long_chat(stack.url)
    status, _, [refused] = post(stack.url, "/v1/chat/completions", {
        "model": TINY, "messages": messages, "max_tokens": 8})
    assert status == 400  # the OpenAI route still refuses: OpenAI's clients expect it

    whole = c.chat(TINY, messages=messages, options=OPTIONS, stream=False)
    assert whole.done and whole.eval_count > 0 and whole.message.content is not None
    assert 0 < whole.prompt_eval_count <= CTX - OPTIONS["num_predict"]

    status, headers, lines = post(stack.url, "/api/chat", {
        "model": TINY, "messages": messages, "options": OPTIONS, "stream": False})
    note = headers[WARNING]
    assert status == 200 and f"of {len(messages)} messages" in note and "context" in note
    dropped = int(note.split("dropped the ")[1].split(" ")[0])
    assert 0 < dropped < len(messages) - 2
    # what the model read is the system message and the newest turns: the same chat sent
    # already cut reads as many tokens, and without its system message fewer
    kept = [SYSTEM, *messages[1 + dropped:]]
    assert kept[-1] == messages[-1]
    same = c.chat(TINY, messages=kept, options=OPTIONS, stream=False)
    assert same.prompt_eval_count == whole.prompt_eval_count == lines[0]["prompt_eval_count"]
    bare = c.chat(TINY, messages=kept[1:], options=OPTIONS, stream=False)
    assert bare.prompt_eval_count < whole.prompt_eval_count
    # streamed too: the refusal came before any stream bytes
    parts = list(c.chat(TINY, messages=messages, options=OPTIONS, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].prompt_eval_count == whole.prompt_eval_count
    status, headers, lines = post(stack.url, "/api/chat", {
        "model": TINY, "messages": messages, "options": OPTIONS})
    assert status == 200 and WARNING in headers and len(lines) > 1 and lines[-1]["done"]


def test_a_latest_message_too_long_alone_loses_its_start(stack) -> None:
    c = ollama.Client(host=stack.url)
    text = " ".join(f"line {i} of the logbook." for i in range(400)) + " THE END"
    assert tokens(stack.url, text) > CTX
    answer = c.chat(TINY, messages=[SYSTEM, {"role": "user", "content": text}],
                    options=OPTIONS)
    assert answer.done and 0 < answer.prompt_eval_count <= CTX - OPTIONS["num_predict"]
    status, headers, _ = post(stack.url, "/api/chat", {
        "model": TINY, "messages": [SYSTEM, {"role": "user", "content": text}],
        "options": OPTIONS, "stream": False})
    assert status == 200 and "cut the start of the last message" in headers[WARNING]

    generated = c.generate(TINY, prompt=text, system="Be brief.", options=OPTIONS)
    assert generated.done and 0 < generated.prompt_eval_count <= CTX
    raw = c.generate(TINY, prompt=text, raw=True, options=OPTIONS)
    assert raw.done and 0 < raw.prompt_eval_count <= CTX
    parts = list(c.generate(TINY, prompt=text, options=OPTIONS, stream=True))
    assert parts[-1].done and parts[-1].prompt_eval_count <= CTX


def test_truncate_false_gets_ollamas_refusal(stack) -> None:
    messages = long_chat(stack.url)
    for path, body in (("/api/chat", {"messages": messages}),
                       ("/api/generate", {"prompt": messages[1]["content"] * 40}),
                       ("/api/chat", {"messages": messages, "stream": True})):
        status, headers, [answer] = post(stack.url, path, {
            "model": TINY, "options": OPTIONS, "truncate": False, **body})
        # Ollama passes llama-server's refusal on as its message
        assert status == 400 and WARNING not in headers, answer
        inner = json.loads(answer["error"])["error"]
        assert inner["type"] == "exceed_context_size_error" and inner["n_ctx"] == CTX
        assert inner["n_prompt_tokens"] > CTX


def test_a_chat_that_fits_is_unchanged(stack) -> None:
    messages = [SYSTEM, {"role": "user", "content": "Is the lamp lit?"}]
    status, headers, [answer] = post(stack.url, "/api/chat", {
        "model": TINY, "messages": messages, "options": OPTIONS, "stream": False})
    assert status == 200 and WARNING not in headers
    _, _, [same] = post(stack.url, "/api/chat", {
        "model": TINY, "messages": messages, "options": OPTIONS, "stream": False,
        "truncate": False})
    assert same["prompt_eval_count"] == answer["prompt_eval_count"]
    assert same["message"] == answer["message"]


def test_embed_keeps_each_inputs_start(stack) -> None:
    c = ollama.Client(host=stack.url)
    text = "the tide " * 600
    short = c.embed(EMB, input="short")
    many = c.embed(EMB, input=[text, "short"])
    assert len(many.embeddings) == 2 and many.embeddings[1] == short.embeddings[0]
    assert short.prompt_eval_count < many.prompt_eval_count <= CTX + short.prompt_eval_count
    status, headers, _ = post(stack.url, "/api/embed", {"model": EMB, "input": text})
    assert status == 200 and "cut the end of 1 of 1 inputs" in headers[WARNING]

    with pytest.raises(ollama.ResponseError) as e:
        c.embed(EMB, input=text, truncate=False)
    assert e.value.status_code == 400
    assert e.value.error == "the input length exceeds the context length"
    # the older route cuts nothing, in Ollama too
    with pytest.raises(ollama.ResponseError) as e:
        c.embeddings(EMB, prompt=text)
    assert e.value.status_code == 500
    assert e.value.error == "the input length exceeds the context length"
