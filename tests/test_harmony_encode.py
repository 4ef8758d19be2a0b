"""OpenAI requests rendered to Harmony, token for token against what openai-harmony renders
for the same conversation written out by hand."""

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from services.proxy.harmony.encode import RequestError, prompt_tokens
from shared.harmony_encoding import check_vocabulary, encoding

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "Weather for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time"}}]


def system(effort=ReasoningEffort.MEDIUM) -> Message:
    return Message.from_role_and_content(Role.SYSTEM,
                                         SystemContent.new().with_reasoning_effort(effort))


def expected(*messages: Message) -> list[int]:
    return encoding().render_conversation_for_completion(
        Conversation.from_messages(list(messages)), Role.ASSISTANT)


def tools_dev(instructions: str | None = None, only: str | None = None) -> Message:
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions(instructions)
    descs = [ToolDescription.new("get_weather", "Weather for a city", parameters=WEATHER),
             ToolDescription.new("get_time", "Local time")]
    return Message.from_role_and_content(
        Role.DEVELOPER, dev.with_function_tools([d for d in descs if only in (None, d.name)]))


def test_the_shipped_vocabulary_is_the_official_file() -> None:
    assert check_vocabulary().stat().st_size == 3613922


def test_plain_user_message() -> None:
    got = prompt_tokens({"messages": [{"role": "user", "content": "Hello"}]})
    assert got == expected(system(), Message.from_role_and_content(Role.USER, "Hello"))
    text = encoding().decode_utf8(got)
    assert text.endswith("<|start|>user<|message|>Hello<|end|><|start|>assistant")


def test_system_and_developer_become_developer_instructions() -> None:
    got = prompt_tokens({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"}]})
    dev = DeveloperContent.new().with_instructions("Be brief.\n\nAnswer in French.")
    assert got == expected(system(), Message.from_role_and_content(Role.DEVELOPER, dev),
                           Message.from_role_and_content(Role.USER, "Hi"))


def test_tools_become_the_functions_namespace() -> None:
    got = prompt_tokens({"tools": TOOLS, "messages": [{"role": "user", "content": "Paris?"}]})
    assert got == expected(system(), tools_dev(),
                           Message.from_role_and_content(Role.USER, "Paris?"))
    assert "namespace functions" in encoding().decode_utf8(got)


def test_tool_choice_none_and_a_named_function() -> None:
    user = {"role": "user", "content": "Paris?"}
    assert prompt_tokens({"tools": TOOLS, "tool_choice": "none", "messages": [user]}) == \
        expected(system(), Message.from_role_and_content(Role.USER, "Paris?"))
    named = {"type": "function", "function": {"name": "get_time"}}
    assert prompt_tokens({"tools": TOOLS, "tool_choice": named, "messages": [user]}) == \
        expected(system(), tools_dev(only="get_time"),
                 Message.from_role_and_content(Role.USER, "Paris?"))
    with pytest.raises(RequestError, match="not in tools"):
        prompt_tokens({"tools": TOOLS, "tool_choice": {"function": {"name": "nope"}},
                       "messages": [user]})


def test_two_step_tool_conversation_with_results_and_kept_reasoning() -> None:
    got = prompt_tokens({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Need both cities.", "content": None,
         "tool_calls": [
             {"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 25}'}]})

    def call(city: str) -> Message:
        return (Message.from_role_and_content(Role.ASSISTANT, f'{{"city": "{city}"}}')
                .with_channel("commentary").with_recipient("functions.get_weather")
                .with_content_type("<|constrain|>json"))

    def result(temp: int) -> Message:
        return (Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"),
                                                f'{{"temp": {temp}}}')
                .with_channel("commentary").with_recipient("assistant"))

    want = expected(
        system(), tools_dev(),
        Message.from_role_and_content(Role.USER, "Weather in Paris and Rome?"),
        Message.from_role_and_content(Role.ASSISTANT, "Need both cities.")
        .with_channel("analysis"),
        call("Paris"), call("Rome"), result(20), result(25))
    assert got == want
    # reasoning within the unfinished turn is kept, as Harmony requires
    assert "Need both cities." in encoding().decode_utf8(got)


def test_reasoning_of_finished_turns_is_dropped() -> None:
    got = prompt_tokens({"messages": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "reasoning_content": "Simple sum.", "content": "2"},
        {"role": "user", "content": "2+2?"}]})
    text = encoding().decode_utf8(got)
    assert "Simple sum." not in text and "<|channel|>final<|message|>2<|end|>" in text


@pytest.mark.parametrize(("effort", "level"), [("low", ReasoningEffort.LOW),
                                               ("high", ReasoningEffort.HIGH)])
def test_reasoning_effort(effort, level) -> None:
    got = prompt_tokens({"reasoning_effort": effort,
                         "messages": [{"role": "user", "content": "x"}]})
    assert got == expected(system(level), Message.from_role_and_content(Role.USER, "x"))
    assert f"Reasoning: {effort}" in encoding().decode_utf8(got)


def test_preset_effort_is_the_default_and_bad_values_are_clear() -> None:
    got = prompt_tokens({"messages": [{"role": "user", "content": "x"}]}, "high")
    assert "Reasoning: high" in encoding().decode_utf8(got)
    with pytest.raises(RequestError, match="reasoning_effort"):
        prompt_tokens({"reasoning_effort": "max", "messages": [{"role": "user"}]})
    with pytest.raises(RequestError, match="tool_call_id"):
        prompt_tokens({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]})
