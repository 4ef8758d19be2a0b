"""Harmony completions decoded at random chunk boundaries."""

import json
import random

import pytest

from services.proxy.harmony.decode import HarmonyDecoder
from tests.harmony_completions import analysis, call, completion, final, preamble, special


def decode(tokens: list[int], seed: int) -> tuple[HarmonyDecoder, list[dict]]:
    rng = random.Random(seed)
    decoder, deltas, i = HarmonyDecoder(), [], 0
    while i < len(tokens):
        n = rng.randint(1, 7)
        deltas += decoder.feed(tokens[i:i + n])
        i += n
    deltas += decoder.finish()
    return decoder, deltas


SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
def test_reasoning_then_final(seed) -> None:
    d, deltas = decode(completion(analysis("User says hi. Reply."), final("Hello there!")), seed)
    assert d.result.reasoning == "User says hi. Reply."
    assert d.result.content == "Hello there!" and d.calls == 0 and d.stopped
    assert "".join(x.get("content", "") for x in deltas) == "Hello there!"
    assert "".join(x.get("reasoning_content", "") for x in deltas) == "User says hi. Reply."


@pytest.mark.parametrize("seed", SEEDS)
def test_one_and_several_tool_calls(seed) -> None:
    d, deltas = decode(completion(analysis("Two lookups."),
                                  call("get_weather", '{"city": "Paris"}')), seed)
    assert d.calls == 1 and d.result.content == ""
    assert d.result.tool_calls[0]["function"] == {"name": "get_weather",
                                                  "arguments": '{"city": "Paris"}'}
    assert d.result.tool_calls[0]["id"].startswith("call_")

    # two calls in one turn: the first ends in <|end|>, the second in <|call|>
    two = (completion(call("get_weather", '{"city": "Paris"}'))[:-1] + special("<|end|>")
           + special("<|start|>assistant") + completion(call("get_time", '{"zone": "CET"}')))
    d, deltas = decode(two, seed)
    assert [c["function"]["name"] for c in d.result.tool_calls] == ["get_weather", "get_time"]
    args: dict[int, str] = {}
    for delta in deltas:
        for c in delta.get("tool_calls", []):
            args[c["index"]] = args.get(c["index"], "") + c["function"]["arguments"]
    assert [json.loads(args[i]) for i in (0, 1)] == [{"city": "Paris"}, {"zone": "CET"}]


def test_preamble_is_content_and_bad_json_arguments_come_back_as_written() -> None:
    d, _ = decode(completion(preamble("Let me check."), call("f", "{city: Paris")), 1)
    assert d.result.content == "Let me check."
    assert d.result.tool_calls[0]["function"]["arguments"] == "{city: Paris"


@pytest.mark.parametrize("cut", [3, 6, 1])
def test_truncated_output_keeps_what_was_produced(cut) -> None:
    tokens = completion(final("The answer is forty two, of course."))[:-cut]
    d, deltas = decode(tokens, 3)
    assert not d.stopped
    assert "The answer is forty two, of course.".startswith(d.result.content)
    if cut == 1:  # only the stop token missing: the whole answer is there
        assert d.result.content == "The answer is forty two, of course."


def test_malformed_header_is_passed_through_as_text() -> None:
    tokens = special("<|channel|>final<|message|>Hi.<|end|><|start|>assistant<|channel|>")
    tokens += special("<|message|><|start|>oops then text")
    d, deltas = decode(tokens, 2)
    text = "".join(x.get("content", "") for x in deltas)
    assert text.startswith("Hi.") and "oops then text" in text and d.failed


def test_text_after_the_last_message_is_not_lost() -> None:
    tokens = special("<|channel|>final<|message|>Done.<|end|>") + special("stray words")
    d, deltas = decode(tokens, 4)
    assert d.result.content.startswith("Done.") and "stray words" in d.result.content


def test_text_with_no_header_is_streamed_as_it_comes() -> None:
    decoder = HarmonyDecoder()
    words = special(" word" * 80)
    early = decoder.feed(words[:70])  # no header this long: plain text, given now
    assert "".join(d.get("content", "") for d in early).startswith(" word word")
    rest = decoder.feed(words[70:]) + decoder.finish()
    assert "".join(d.get("content", "") for d in early + rest) == " word" * 80


def test_a_cut_inside_a_header_leaves_no_markup() -> None:
    tokens = completion(analysis("Hi."), final("Hello"))
    cut = tokens.index(special("<|start|>")[0]) + 3  # inside the final message's header
    decoder, deltas = decode(tokens[:cut], 1)
    assert decoder.result.reasoning == "Hi." and decoder.result.content == ""
    assert not any("<|" in d.get("content", "") for d in deltas)
