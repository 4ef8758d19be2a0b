"""GPT-OSS end to end on the real llama-server router, with the official openai client.

The model is a tiny random-weight gpt-oss with the real o200k_harmony tokenizer
(tests/tiny_gptoss.py); a grammar of token ids in each request makes it write exactly the
Harmony completion a test wants, and `logit_bias` picks the token that ends it."""

from __future__ import annotations

import json

import openai
import pytest

from services.proxy.harmony.constraints import CALL, ENDOFTEXT, RETURN
from tests.harmony_completions import analysis, call, completion, final, preamble, special
from tests.harness import http
from tests.tiny_gptoss import cached_model, chat_template

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def forced(tokens: list[int]) -> dict:
    """extra_body making the model write `tokens`, the last one ending generation."""
    *body, end = tokens
    return {"grammar": "root ::= " + " ".join(f"<[{t}]>" for t in body),
            "logit_bias": [[t, False] for t in (RETURN, CALL, ENDOFTEXT) if t != end]}


def start(stack_factory, models_dir, config_dir, harmony: str = "proxy"):
    link = models_dir / "pub" / "tiny-gptoss-GGUF" / "tiny-gptoss-Q8_0.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(cached_model())
    stack = stack_factory().start()
    ids = [m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]]
    model = next(i for i in ids if "gptoss" in i)
    if harmony != "proxy":
        (config_dir / "custom_models.yaml").write_text(
            f"models:\n  {model}:\n    harmony: {harmony}\n")
        assert stack.cli("sync").returncode == 0
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    return client, model


@pytest.fixture
def gptoss(stack_factory, models_dir, config_dir):
    return start(stack_factory, models_dir, config_dir)


def test_reasoning_and_answer_streamed_or_not(gptoss) -> None:
    client, model = gptoss
    tokens = completion(analysis("The user greets me."),
                        final("Hello! The token <|call|> ends a tool call."))
    resp = client.chat.completions.create(model=model, messages=ASK, max_tokens=100,
                                          extra_body=forced(tokens))
    message = resp.choices[0].message
    # the text mentioning <|call|> arrives whole: no stop string cuts it
    assert message.content == "Hello! The token <|call|> ends a tool call."
    assert message.model_extra["reasoning_content"] == "The user greets me."
    assert resp.choices[0].finish_reason == "stop" and resp.model == model
    chunks = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=100,
                                                 stream=True, extra_body=forced(tokens)))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == \
        "The user greets me."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1 and sum(1 for d in deltas if d.role) == 1
    # max_tokens ending inside the next message's header: no markup reaches the client
    cut = tokens.index(special("<|start|>")[0]) + 3
    resp = client.chat.completions.create(model=model, messages=ASK, max_tokens=cut,
                                          extra_body=forced(tokens))
    assert resp.choices[0].finish_reason == "length"
    assert not resp.choices[0].message.content  # nothing of the cut header
    assert resp.choices[0].message.model_extra["reasoning_content"] == "The user greets me."


def test_requests_harmony_cannot_express_are_400(gptoss) -> None:
    client, model = gptoss
    with pytest.raises(openai.BadRequestError, match="reasoning_effort must be low, medium"):
        client.chat.completions.create(model=model, messages=ASK, reasoning_effort="max")
    with pytest.raises(openai.BadRequestError, match="non-empty list"):
        client.chat.completions.create(model=model, messages=[])


@pytest.mark.parametrize("form", ["recipient after the channel", "recipient in the header"])
def test_a_tool_call_in_either_harmony_form(gptoss, form) -> None:
    client, model = gptoss
    if form == "recipient after the channel":
        tokens = completion(preamble("Let me check."), call("get_weather", '{"city":"Paris"}'))
    else:
        tokens = special(
            "<|channel|>commentary<|message|>Let me check.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary "
            '<|constrain|>json<|message|>{"city":"Paris"}<|call|>')
    resp = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                          max_tokens=100, extra_body=forced(tokens))
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [tool_call] = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}

    # the second turn: the tool's result goes back, the model answers from it
    messages = [*ASK, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": tool_call.id, "content": "18°C, sunny"}]
    resp = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                          max_tokens=100,
                                          extra_body=forced(completion(final("18°C, sunny."))))
    assert resp.choices[0].message.content == "18°C, sunny."
    assert resp.choices[0].finish_reason == "stop"


def test_json_answers_and_required_calls_follow_their_schema(gptoss) -> None:
    client, model = gptoss
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=60, response_format={
            "type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert json.loads(resp.choices[0].message.content)["city"] in ("Paris", "Rome")
    resp = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [tool_call] = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls"
    assert json.loads(tool_call.function.arguments)["city"] in ("Paris", "Rome")


def test_an_engine_error_mid_answer_reaches_the_client(gptoss) -> None:
    client, model = gptoss
    # an end-of-generation token inside a grammar is the engine's own error, mid-answer
    tokens = completion(analysis("Thinking it over."), final("Hi"))
    broken = {"grammar": "root ::= " + " ".join(f"<[{t}]>" for t in tokens)}
    with pytest.raises(openai.APIError, match="engine"):
        for _ in client.chat.completions.create(model=model, messages=ASK, max_tokens=100,
                                                stream=True, extra_body=broken):
            pass
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=model, messages=ASK, max_tokens=100,
                                       extra_body=broken)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=ASK, max_tokens=10,
                                       extra_body={"grammar": "root ::= ("})


@pytest.mark.skipif(chat_template() is None, reason="gpt-oss's chat template comes with the "
                    "llama-server source build")
def test_native_harmony_is_llama_servers_own(stack_factory, models_dir, config_dir) -> None:
    client, model = start(stack_factory, models_dir, config_dir, harmony="native")
    tokens = completion(analysis("The user greets me."), final("Hello!"))
    resp = client.chat.completions.create(model=model, messages=ASK, max_tokens=100,
                                          extra_body=forced(tokens))
    assert resp.choices[0].message.content == "Hello!"
    assert resp.choices[0].message.model_extra["reasoning_content"] == "The user greets me."
    with pytest.raises(openai.BadRequestError):  # its own parser refuses a grammar with tools
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=20,
                                       extra_body=forced(tokens))


def test_a_required_call_among_several_tools_follows_the_chosen_schema(gptoss) -> None:
    client, model = gptoss
    clock = {"type": "function", "function": {
        "name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC"]}},
                       "required": ["zone"], "additionalProperties": False}}}
    resp = client.chat.completions.create(model=model, messages=ASK, tools=[*TOOLS, clock],
                                          tool_choice="required", max_tokens=60)
    [tool_call] = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls"
    arguments = json.loads(tool_call.function.arguments)
    assert (tool_call.function.name, list(arguments)) in (("get_weather", ["city"]),
                                                          ("get_time", ["zone"]))


def test_a_call_cut_by_max_tokens_is_length(gptoss) -> None:
    client, model = gptoss
    tokens = completion(call("get_weather", '{"city":"Paris"}'))
    resp = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                          max_tokens=len(tokens) - 3, extra_body=forced(tokens))
    assert resp.choices[0].finish_reason == "length"  # its arguments are not whole
