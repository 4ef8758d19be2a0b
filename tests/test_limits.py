"""The per-model limit: its decisions (order, bound, clients that leave while waiting), then
the real thing in front of a busy llama-server."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from http.client import HTTPConnection

import aiohttp
import pytest

from services.proxy.models.limits import Limits, QueueFull
from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.streams import chat

SLOW = "ms/slow:33.8m-f32"


async def hold(limits: Limits, order: list[str], name: str, release: asyncio.Event,
               limit: int = 1) -> None:
    async with limits.slot("m", limit):
        order.append(name)
        await release.wait()


def test_waiting_requests_are_answered_in_arrival_order() -> None:
    async def main() -> list[str]:
        limits, order, go = Limits(max_queue=10), [], asyncio.Event()
        tasks = []
        for name in "abcd":
            tasks.append(asyncio.create_task(hold(limits, order, name, go)))
            await asyncio.sleep(0)
        assert order == ["a"] and limits.stats("m")["queued"] == 3
        go.set()
        await asyncio.gather(*tasks)
        return order
    assert asyncio.run(main()) == list("abcd")


def test_past_the_queue_a_request_is_told_when_to_come_back() -> None:
    async def main() -> None:
        limits, order, go = Limits(max_queue=1), [], asyncio.Event()
        first = asyncio.create_task(hold(limits, order, "a", go))
        second = asyncio.create_task(hold(limits, order, "b", go))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            async with limits.slot("m", 1):
                pass
        assert full.value.waiting == 1 and full.value.retry_after >= 1
        go.set()
        await asyncio.gather(first, second)
        assert order == ["a", "b"] and limits.stats("m")["active"] == 0
    asyncio.run(main())


def test_a_client_that_leaves_the_queue_costs_no_slot() -> None:
    async def main() -> None:
        limits, order, go = Limits(max_queue=10), [], asyncio.Event()
        first = asyncio.create_task(hold(limits, order, "a", go))
        leaver = asyncio.create_task(hold(limits, order, "gone", go))
        last = asyncio.create_task(hold(limits, order, "c", go))
        await asyncio.sleep(0)
        leaver.cancel()
        go.set()  # the slot is handed on in the same step the leaver is cancelled in
        await asyncio.gather(first, last)
        assert order == ["a", "c"] and limits.stats("m") == {
            "active": 0, "queued": 0, "longest_queued_seconds": 0.0,
            "queued_seconds_total": limits.stats("m")["queued_seconds_total"]}
        async with limits.slot("m", 1):  # and the lane is free
            pass
    asyncio.run(main())


def test_a_raised_limit_lets_waiting_requests_in() -> None:
    async def main() -> None:
        limits, order, go = Limits(max_queue=10), [], asyncio.Event()
        held = [asyncio.create_task(hold(limits, order, n, go)) for n in "ab"]
        await asyncio.sleep(0)
        assert order == ["a"]  # b waits behind the only slot
        held.append(asyncio.create_task(hold(limits, order, "c", go, limit=3)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sorted(order) == ["a", "b", "c"]  # the config now allows three at once
        go.set()
        await asyncio.gather(*held)
    asyncio.run(main())


def running_queue(stack, model: str) -> dict:
    return next(m["queue"] for m in http("GET", stack.url + "/running")[1]["models"]
                if m["id"] == model)


def test_a_busy_model_queues_in_order_then_says_when_to_come_back(stack_factory, models_dir,
                                                                 config_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {SLOW.removeprefix('ms/')}:\n    parallel: 2\n    max_concurrent: 1\n")
    stack = stack_factory(MAX_QUEUE="1").start()
    assert http("POST", stack.url + "/models/load", {"model": SLOW})[0] == 200
    port = int(stack.env["HARMONY_PROXY_PORT"])
    first = HTTPConnection("127.0.0.1", port, timeout=60)  # a stream that goes on until closed
    first.request("POST", "/v1/chat/completions", json.dumps(
        chat(SLOW, max_tokens=100000, ignore_eos=True, stream=True)),
        {"Content-Type": "application/json"})
    assert first.getresponse().status == 200
    wait(lambda: running_queue(stack, SLOW)["active"] == 1, 30)
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(
        http("POST", stack.url + "/v1/chat/completions", chat(SLOW))))
    waiter.start()
    wait(lambda: running_queue(stack, SLOW)["queued"] == 1, 30)
    # the queue (MAX_QUEUE=1) is full: the third is told when to come back
    third = urllib.request.Request(stack.url + "/v1/chat/completions", method="POST",
                                   data=json.dumps(chat(SLOW)).encode(),
                                   headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as busy:
        urllib.request.urlopen(third, timeout=60)
    assert busy.value.code == 503 and int(busy.value.headers["Retry-After"]) >= 1
    error = json.loads(busy.value.read())["error"]
    assert error["code"] == "model_busy" and "MAX_QUEUE" in error["message"]
    assert not second  # still waiting: the model answers one at a time
    first.close()  # the stream's client leaves: its slot goes to the one waiting
    waiter.join(60)
    assert second and second[0][0] == 200
    queue = running_queue(stack, SLOW)
    assert queue["active"] == 0 and queue["queued"] == 0 and queue["queued_seconds_total"] > 0


def test_a_queued_stream_starts_as_the_one_before_it_ends(stack_factory) -> None:
    """llama-server closes the connection a stream went over: the next stream, let in that
    very moment, must not be sent on it."""
    stack = stack_factory().start()
    model = "ms/tiny:0.2m-f32"  # one slot: the streams take turns

    async def round_of_streams(session: aiohttp.ClientSession) -> list[int]:
        async def one() -> int:
            async with session.post(stack.url + "/v1/chat/completions", json=chat(
                    model, max_tokens=200, ignore_eos=True, stream=True)) as resp:
                await resp.read()
                return resp.status
        return list(await asyncio.gather(*(one() for _ in range(4))))

    async def main() -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            return [await round_of_streams(session) for _ in range(8)]

    assert asyncio.run(main()) == [[200] * 4] * 8
