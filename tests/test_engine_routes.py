"""Every per-model route of llama-server through the proxy, as a client sees it: the official
`anthropic` and `openai` SDKs and raw requests, against the real llama-server (the router,
and the real llama-swap: tests/real_engines.py), and Ollama's own /v1/messages and
/v1/responses (the real Ollama, where there is one)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from shared.tiny_gguf import write_model
from tests.harness import http
from tests.real_engines import llama_swap_bin_dir
from tests.test_direct_path import SLOW, model_process

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
EMB, RERANKER = "ms/emb:0.2m-f32", "ms/rr:0.2m-f32"
HI = [{"role": "user", "content": "hi"}]
# Whole characters only: llama-server sends no message_start (Anthropic) when its first
# token is part of a character, which random weights over a byte vocabulary often make.
ASCII = {"grammar": "root ::= [a-z ]+"}


@pytest.fixture
def kinds(models_dir: Path, config_dir: Path) -> None:
    """An embedding model and a reranker beside the two chat models; `other` serves
    /metrics, which llama-server offers only with --metrics."""
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    write_model(models_dir / "pub" / "rr" / "rr-F32.gguf", name="rr", pooling_type=4)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  other:0.2m-f32:\n    sampler_args: --metrics\n")


@pytest.fixture
def stack(stack_factory, kinds):
    return stack_factory().start()


@pytest.fixture
def swap_stack(stack_factory, tmp_path):
    path = f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    return stack_factory(ENGINE="llama-swap", PATH=path).start()


def claude(stack, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


def gpt(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)


def messages_round(client: anthropic.Anthropic, model: str) -> None:
    """messages.create, then messages.stream with Anthropic's whole event sequence."""
    message = client.messages.create(model=model, max_tokens=8, messages=HI, extra_body=ASCII)
    assert message.model == model and message.type == "message"
    assert message.content[0].type == "text" and message.usage.output_tokens > 0
    with client.messages.stream(model=model, max_tokens=8, messages=HI,
                                extra_body=ASCII) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "message_delta"} <= set(kinds)
    assert final.model == model and final.content[0].text


def responses_round(client: openai.OpenAI, model: str) -> None:
    """responses.create, then a streamed response from response.created to .completed."""
    response = client.responses.create(model=model, input="hi", max_output_tokens=8,
                                       extra_body=ASCII)
    assert response.model == model and response.status == "completed"
    assert isinstance(response.output_text, str) and response.usage.output_tokens > 0
    stream = client.responses.create(model=model, input="hi", max_output_tokens=8, stream=True,
                                     extra_body=ASCII)
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.model == model and events[-1].response.output_text == text
    # the SDK's stream helper, which follows the events by their indexes
    with client.responses.stream(model=model, input="hi", max_output_tokens=8,
                                 extra_body=ASCII) as helper:
        deltas = "".join(e.delta for e in helper if e.type == "response.output_text.delta")
        assert helper.get_final_response().output_text == deltas


def test_anthropic_sdk_messages_stream_and_count_tokens(stack) -> None:
    client = claude(stack)
    messages_round(client, TINY)
    messages_round(client, "tiny-0.2m-f32")  # another spelling, named back as it was asked
    counted = client.messages.count_tokens(model=TINY, messages=HI)
    assert counted.input_tokens > 0


def test_a_messages_stream_cut_short_is_an_error_the_sdk_raises(stack_factory,
                                                                models_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)  # slow enough that the answer is still coming when its server dies
    stack = stack_factory().start()
    received = 0
    with pytest.raises(anthropic.APIStatusError) as raised, claude(stack).messages.stream(
            model=SLOW, max_tokens=100000, messages=HI,
            extra_body={"ignore_eos": True, **ASCII}) as stream:
        for _ in stream:
            received += 1
            if received == 5:
                model_process(stack, SLOW).kill()
    assert raised.value.body["error"]["type"] == "api_error"
    assert "may have crashed" in raised.value.message and received >= 5


def test_anthropic_sdk_raises_the_class_of_each_error(stack_factory, kinds) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    with pytest.raises(anthropic.AuthenticationError) as raised:
        claude(stack, "wrong").messages.create(model=TINY, max_tokens=4, messages=HI)
    assert raised.value.body["error"]["type"] == "authentication_error"
    client = claude(stack, "s3cret")  # sent as x-api-key, with anthropic-version
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="ms/tinny:0.2m", max_tokens=4, messages=HI)
    assert raised.value.body["error"]["type"] == "not_found_error" and TINY in raised.value.message
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.count_tokens(model="", messages=HI)
    assert "'model' is required" in raised.value.message
    assert client.messages.create(model=TINY, max_tokens=4, messages=HI).model == TINY
    status, body = http("POST", stack.url + "/v1/messages", b"{", {"x-api-key": "s3cret"})
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    # no messages: llama-server would answer 500, which the SDK retries
    status, body = http("POST", stack.url + "/v1/messages", {"model": TINY, "max_tokens": 4},
                        {"x-api-key": "s3cret"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_openai_sdk_responses_chat_and_embeddings(stack) -> None:
    client = gpt(stack)
    responses_round(client, TINY)
    assert client.responses.input_tokens.count(model=TINY, input="hi").input_tokens > 0
    chat = client.chat.completions.create(model=TINY, messages=HI, max_tokens=4)
    assert chat.model == TINY and chat.choices[0].message.role == "assistant"
    vectors = client.embeddings.create(model=EMB, input=["hello", "world"])
    assert vectors.model == EMB and [d.index for d in vectors.data] == [0, 1]
    assert len(vectors.data[0].embedding) == 64


def test_embeddings_of_a_model_that_does_not_embed_say_which_do(stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        gpt(stack).embeddings.create(model=TINY, input="hello")
    message = raised.value.message
    assert f"{TINY} is not an embedding model" in message and EMB in message
    assert RERANKER not in message and raised.value.code == "not_embedding_model"


def test_rerank_on_a_reranker_and_on_a_chat_model(stack) -> None:
    ask = {"model": RERANKER, "query": "cat", "documents": ["a cat", "a car", "the sea"]}
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        status, body = http("POST", stack.url + path, ask)
        assert status == 200 and body["model"] == RERANKER, body
        assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]
        assert all(isinstance(r["relevance_score"], float) for r in body["results"])
    status, body = http("POST", stack.url + "/v1/rerank", ask | {"model": TINY})
    assert status == 400 and body["error"]["code"] == "not_rerank_model"
    assert TINY in body["error"]["message"] and RERANKER in body["error"]["message"]
    # Ollama's embeddings routes ask the same of the model, before loading it
    for model in (TINY, RERANKER):
        for path, field in (("/api/embed", "input"), ("/api/embeddings", "prompt")):
            status, body = http("POST", stack.url + path, {"model": model, field: "x"})
            assert status == 400 and EMB in body["error"] and path in body["error"], body
    assert http("POST", stack.url + "/api/show", {"model": RERANKER})[1][
        "capabilities"] == ["rerank"]


def test_llama_server_routes_answer_per_model(stack) -> None:
    def post(path: str, **body) -> tuple[int, dict]:
        return http("POST", stack.url + path, {"model": TINY, **body})

    status, tokens = post("/tokenize", content="hi")
    assert status == 200 and tokens["tokens"]
    # byte tokens, after the vocabulary's word-start mark
    assert post("/detokenize", tokens=tokens["tokens"][-2:]) == (200, {"content": "hi"})
    assert post("/apply-template", messages=HI)[1]["prompt"] == "<|user|>hi\n<|assistant|>"
    status, body = post("/completion", prompt="ab", n_predict=3)
    assert status == 200 and body["model"] == TINY and body["tokens_predicted"] == 3
    for path in ("/v1/chat/completions/input_tokens", "/v1/responses/input_tokens"):
        status, body = post(path, messages=HI, input="hi")
        assert status == 200 and body["input_tokens"] > 0, body
    # a model without fill-in-the-middle tokens: the engine's reason, with model and route
    status, body = post("/infill", input_prefix="ab", input_suffix="cd")
    assert status == 400 and f"{TINY} /infill: Infill is not supported" in \
        body["error"]["message"]  # 400, not llama-server's 501: the SDKs retry a 5xx


def test_a_streamed_completion_passes_through_whole(stack) -> None:
    req = urllib.request.Request(stack.url + "/completion", data=json.dumps(
        {"model": TINY, "prompt": "ab", "n_predict": 8, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "error" not in events[-1]


def test_get_routes_take_the_model_as_a_query_parameter(stack) -> None:
    status, props = http("GET", f"{stack.url}/props?model={TINY}")
    assert status == 200 and props["default_generation_settings"]["n_ctx"] > 0
    status, slots = http("GET", f"{stack.url}/slots?model={TINY}")
    assert status == 200 and slots[0]["n_ctx"] > 0
    status, metrics = http("GET", f"{stack.url}/metrics?model={OTHER}")
    assert status == 200 and "llamacpp:" in metrics  # Prometheus text
    status, body = http("GET", f"{stack.url}/metrics?model={TINY}")  # run without --metrics
    assert status == 400 and f"{TINY} /metrics" in body["error"]["message"]
    assert "sampler_args" in body["error"]["message"]
    status, body = http("GET", stack.url + "/props")
    assert status == 400 and "'?model=<id>'" in body["error"]["message"]
    status, metrics = http("GET", stack.url + "/metrics")  # without ?model=: the stack's own
    assert status == 200 and "model_serve_requests_total" in metrics
    status, body = http("GET", stack.url + "/slots?model=ms/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_audio_transcriptions_find_the_model_in_the_form(stack) -> None:
    client = gpt(stack)
    with pytest.raises(openai.BadRequestError) as raised:  # the tiny model has no ears
        client.audio.transcriptions.create(model=TINY, file=("a.wav", b"RIFF" + bytes(64)))
    assert raised.value.status_code == 400
    assert f"{TINY} /v1/audio/transcriptions" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="ms/nope", file=("a.wav", b"RIFF"))
    form = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nx\r\n--B--\r\n'
    status, body = http("POST", stack.url + "/v1/audio/transcriptions", form,
                        {"Content-Type": "multipart/form-data; boundary=B"})
    assert status == 400 and "'model' field" in body["error"]["message"]


def test_bodies_over_the_limit_are_413_in_each_routes_shape(stack_factory) -> None:
    stack = stack_factory(MAX_BODY_BYTES="4096").start()
    with pytest.raises(openai.APIStatusError) as raised:
        gpt(stack).audio.transcriptions.create(model=TINY, file=("a.wav", bytes(10000)))
    assert raised.value.status_code == 413 and "MAX_BODY_BYTES" in raised.value.message
    with pytest.raises(anthropic.APIStatusError) as raised:
        claude(stack).messages.create(model=TINY, max_tokens=4, messages=[
            {"role": "user", "content": "x" * 10000}])
    assert raised.value.status_code == 413
    assert raised.value.body["error"]["type"] == "request_too_large"


def test_messages_and_responses_through_llama_swap(swap_stack) -> None:
    assert http("GET", swap_stack.url + "/health")[1]["engine"]["name"] == "llama-swap"
    messages_round(claude(swap_stack), TINY)
    responses_round(gpt(swap_stack), OTHER)
    status, body = http("GET", f"{swap_stack.url}/props?model={TINY}")
    assert status == 200 and body["default_generation_settings"]["n_ctx"] > 0
    # and Ollama's API, over the same models
    ollama_client = ollama.Client(host=swap_stack.url)
    assert ollama_client.chat(TINY, messages=HI, options={"num_predict": 4}).done
    assert TINY in {m.model for m in ollama_client.ps().models}


@pytest.fixture
def ollama_stack(stack_factory, real_ollama):
    # Ollama's own model: its store is not linked, so Ollama answers it
    real_ollama.create("olla:1b")
    return stack_factory(OLLAMA_BASE=real_ollama.url).start()


def test_ollama_answers_messages_and_responses_itself(ollama_stack, real_ollama) -> None:
    messages_round(claude(ollama_stack), "olla:1b")
    responses_round(gpt(ollama_stack), "olla:1b")
    # passed on as they came: Ollama answers the same to the same request
    greedy = {"temperature": 0}
    message = claude(ollama_stack).messages.create(model="olla:1b", max_tokens=3, messages=HI,
                                                   extra_body=greedy)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    theirs = anthropic.Anthropic(base_url=real_ollama.url, api_key="x").messages.create(
        model="olla:1b", max_tokens=3, messages=HI, extra_body=greedy)
    assert message.content[0].text == theirs.content[0].text
    response = gpt(ollama_stack).responses.create(model="olla:1b", input="hi",
                                                  max_output_tokens=3, extra_body=greedy)
    assert response.usage.output_tokens == 3


def test_ollama_models_refuse_llama_server_routes_by_name(ollama_stack) -> None:
    status, body = http("POST", ollama_stack.url + "/tokenize",
                        {"model": "olla:1b", "content": "hi"})
    assert status == 400 and body["error"]["code"] == "unsupported_route"
    message = body["error"]["message"]
    assert "olla:1b" in message and "/tokenize" in message and "/v1/messages" in message
    status, body = http("GET", ollama_stack.url + "/slots?model=olla:1b")
    assert status == 400 and "/slots" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude(ollama_stack).messages.count_tokens(model="olla:1b", messages=HI)
    assert "/v1/messages/count_tokens" in raised.value.message
