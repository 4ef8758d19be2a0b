"""GPT-OSS through the proxy where the real engine cannot show the case (what the proxy
sends to /completion; garbled output): a stand-in model server replays completions that
openai-harmony renders, behind the real llama-swap (tests/real_engines.py), which runs it as a
model's `cmd`. Everything else runs on the real engine: tests/test_harmony_real.py; GPT-OSS
through the real Ollama: tests/test_ollama.py."""

import json
import os
import sys
from pathlib import Path

import openai
import pytest

from services.proxy.harmony.encode import prompt_tokens
from tests.harmony_completions import analysis, completion, final, special
from tests.harness import ROOT
from tests.real_engines import llama_swap_bin_dir

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
    path = f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    stack = stack_factory(ENGINE="llama-swap", PATH=path).start()
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    client.stack = stack
    return client


def test_standin_sees_the_prompt_and_samplers_sent(client, script) -> None:
    """What reaches /completion, which only a stand-in can record."""
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
    assert "stop" not in body and body["return_tokens"] is True  # no stop strings of ours


def test_standin_truncated_and_malformed_headers(client, script) -> None:
    """Cases a grammar-forced real model is not used for: a cut and a garbled header."""
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
