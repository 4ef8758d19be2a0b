"""GPT-OSS through the proxy, checked with the official openai client. The engine is a
stand-in replaying completions that openai-harmony renders (a GPT-OSS model cannot run
here), behind the llama-swap stand-in; the Ollama case uses the Ollama stand-in."""

import json
import os
import sys
from pathlib import Path

import openai
import pytest

from services.proxy.harmony_encode import prompt_tokens
from shared.harmony_encoding import encoding
from tests.harmony_completions import analysis, call, completion, final, special
from tests.harness import ROOT, http, swap_bin_dir
from tests.streams import stream_chat

MODEL = "ms/gpt-oss-standin"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return tmp_path / "completion.json"


def plan(script: Path, tokens: list[int], **extra) -> None:
    script.write_text(json.dumps({"tokens": tokens, **extra}))


def sent(script: Path) -> dict:
    return json.loads(Path(f"{script}.request.json").read_text())


@pytest.fixture
def client(stack_factory, config_dir, tmp_path, script):
    plan(script, completion(final("warm up")))
    exe = tmp_path / "bin" / "harmony-llama-server"  # a `cmd` runs a llama-server binary
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m '
                   'tests.standins.harmony_engine "$@"\n')
    exe.chmod(0o755)
    (config_dir / "custom_models.yaml").write_text(f"""
models:
  gpt-oss-standin:
    cmd: "{exe} --port ${{PORT}} --script {script}"
    harmony: proxy
    reasoning_effort: low
""")
    path = f"{swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    stack = stack_factory(ENGINE="llama-swap", PATH=path).start()
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    client.stack = stack
    return client


def test_reasoning_and_answer_with_samplers_kept(client, script) -> None:
    plan(script, completion(analysis("The user greets me."), final("Hello there!")))
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.6,
                                          top_p=0.9, max_tokens=200, seed=3,
                                          extra_body={"min_p": 0.05, "top_k": 40})
    choice = resp.choices[0]
    assert resp.model == MODEL and resp.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content == "Hello there!"
    assert choice.message.model_extra["reasoning_content"] == "The user greets me."
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    body = sent(script)
    want = prompt_tokens({"messages": messages}, "low")  # the preset's reasoning effort
    assert body["prompt"] == want and resp.usage.prompt_tokens == len(want)
    assert resp.usage.completion_tokens == len(completion(analysis("The user greets me."),
                                                          final("Hello there!")))
    assert (body["temperature"], body["top_p"], body["n_predict"], body["seed"]) == (
        0.6, 0.9, 200, 3)
    assert (body["min_p"], body["top_k"]) == (0.05, 40)
    assert body["stop"][:2] == ["<|return|>", "<|call|>"] and body["return_tokens"] is True


def test_streamed_tool_calls_one_id_role_once_and_done(client, script) -> None:
    two = (completion(analysis("Two cities."), call("get_weather", '{"city": "Paris"}'))[:-1]
           + special("<|end|><|start|>assistant")
           + completion(call("get_weather", '{"city": "Rome"}')))
    plan(script, two, seed=11)
    stream = client.chat.completions.create(
        model=MODEL, stream=True, tools=TOOLS, reasoning_effort="high",
        messages=[{"role": "user", "content": "Weather in Paris and Rome?"}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    reasoning = ""
    for c in chunks:
        delta = c.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for tc in delta.tool_calls or []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            if tc.function.name:
                names[tc.index] = tc.function.name
    assert reasoning == "Two cities."
    assert names == {0: "get_weather", 1: "get_weather"}
    assert [json.loads(args[i]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Rome"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(two)
    assert "Reasoning: high" in encoding().decode_utf8(sent(script)["prompt"])
    raw = stream_chat(client.stack.url, MODEL, 1000, tools=TOOLS)  # ends with [DONE]
    assert raw[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_non_streamed_tool_call_and_a_tool_result_round_trip(client, script) -> None:
    plan(script, completion(call("get_weather", '{"city": "Paris"}')))
    resp = client.chat.completions.create(model=MODEL, tools=TOOLS, messages=[
        {"role": "user", "content": "Paris?"}])
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content is None
    (tc,) = msg.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather" and tc.id
    plan(script, completion(final("It is 20 degrees.")))
    resp = client.chat.completions.create(model=MODEL, tools=TOOLS, messages=[
        {"role": "user", "content": "Paris?"}, msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tc.id, "content": '{"temp": 20}'}])
    assert resp.choices[0].message.content == "It is 20 degrees."
    prompt = encoding().decode_utf8(sent(script)["prompt"])
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>' \
        '{"temp": 20}<|end|>' in prompt


def test_truncated_malformed_and_length(client, script) -> None:
    plan(script, completion(final("A long answer that goes on and on.")))
    resp = client.chat.completions.create(model=MODEL, max_tokens=6,
                                          messages=[{"role": "user", "content": "go"}])
    assert resp.choices[0].finish_reason == "length"
    assert "A long answer that goes on and on.".startswith(resp.choices[0].message.content)

    plan(script, special("<|channel|>final<|message|>Partly.<|end|><|start|>assistant"
                         "<|channel|><|message|><|start|>garbled tail"))
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    text = resp.choices[0].message.content
    assert text.startswith("Partly.") and "garbled tail" in text
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model=MODEL, stream=True, messages=[{"role": "user", "content": "x"}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_engine_errors_reach_the_client_with_the_reason(client, script) -> None:
    plan(script, [], status=500, error="the model ran out of memory")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert "the model ran out of memory" in str(e.value)
    url = client.stack.url + "/v1/chat/completions"
    status, body = http("POST", url, {"model": MODEL, "messages": [],
                                      "reasoning_effort": "max"})
    assert status == 400 and "reasoning_effort must be low, medium or high" in \
        body["error"]["message"]
    status, body = http("POST", url, {"model": MODEL, "messages": []})
    assert status == 400 and "non-empty list" in body["error"]["message"]


def test_gpt_oss_served_by_ollama_has_the_same_shape(stack_factory, ollama) -> None:
    url, store = ollama
    stack = stack_factory(OLLAMA_BASE=url, OLLAMA_MODELS=str(store)).start()
    assert stack.cli("pull", "gpt-oss-think-mxfp4:20b").returncode == 0
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model="gpt-oss-think-mxfp4:20b",
                                          messages=[{"role": "user", "content": "hi"}])
    msg = resp.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let me think."
    assert msg.content.startswith("Hello from") and resp.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="gpt-oss-think-mxfp4:20b", stream=True,
        messages=[{"role": "user", "content": "hi"}]))
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                   for c in chunks if c.choices) == "Let me think."
