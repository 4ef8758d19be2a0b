"""Each model's life as its owner, the proxy, runs it, with real llama-server processes on
models big enough to matter (the machine's size simulated, as in test_governor.py): a load
that does not fit waits for room instead of failing, every wait has a bound, every leaving
has its true reason, and the faults of a load or an unload leave serving whole."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import openai
import psutil
import pytest

from shared.engines.base import section_name
from tests.governed import (
    MIB,
    A,
    B,
    C,
    D,
    Stream,
    custom,
    events,
    governor_health,
    held,
    measured,
    need,
    running,
    unloaded,
    use,
)
from tests.harness import http, wait
from tests.streams import chat


class Ask(threading.Thread):
    """One chat request in the background; `.answer` is (status, body) once it is done."""

    def __init__(self, stack, model: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.model, self.answer = stack, model, None

    def run(self) -> None:
        self.answer = http("POST", self.stack.url + "/v1/chat/completions",
                           chat(self.model, max_tokens=2), timeout=120)


def room_for_two(stack, machine) -> dict[str, int]:
    """A and B loaded and measured; the limit leaves room for them, and for C once A (not
    both) has left."""
    use(stack, A)
    use(stack, B)
    sizes = held(stack)
    machine(total=int((sizes[B] + need(stack, C) + 0.25 * sizes[A]) / 0.75))
    return sizes


def busy(stack, *models: str) -> list[Stream]:
    streams = [Stream(stack, m) for m in models]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    return streams


def done(streams: list[Stream]) -> None:
    for s in streams:
        s.stop.set()
        s.join(10)


def test_a_load_that_does_not_fit_waits_until_a_model_goes_idle(gov_stack, machine) -> None:
    stack = gov_stack()
    room_for_two(stack, machine)
    streams = busy(stack, A, B)
    ask = Ask(stack, C)
    ask.start()
    wait(lambda: running(stack).get(C, {}).get("waiting_for"), 20)
    row = running(stack)[C]
    assert "busy" in row["waiting_for"] and A in row["waiting_for"]
    stats = stack.cli("stats")  # the command shows what waits, and for what
    assert stats.returncode == 0 and f"{C} waits" in stats.stdout, stats.stderr
    time.sleep(1)
    assert ask.answer is None  # it waits, and is not refused
    done(streams[:1])  # A's answer ends: A is idle, and goes for C
    ask.join(60)
    assert ask.answer[0] == 200, ask.answer
    assert set(running(stack)) == {B, C}
    assert (A, "admission") in unloaded(stack)
    done(streams[1:])


def test_a_load_waits_at_most_load_wait_then_says_what_held_the_memory(gov_stack,
                                                                      machine) -> None:
    stack = gov_stack(LOAD_WAIT="2")
    room_for_two(stack, machine)
    streams = busy(stack, A, B)
    started = time.monotonic()
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(**chat(C))
    # the SDK does not send it again (x-should-retry: false): one wait, not three
    assert time.monotonic() - started < 2 * 2 + 1
    assert refused.value.response.headers["x-should-retry"] == "false"
    status, body = refused.value.status_code, refused.value.body
    assert status == 503 and time.monotonic() - started < 30
    err = body if "code" in body else body["error"]
    assert err["code"] == "insufficient_memory" and "LOAD_WAIT=2" in err["message"]
    assert "raise LOAD_WAIT or MEMORY_PRESSURE_THRESHOLD" in err["message"]
    assert "busy" in err["message"] and set(err["busy"]) == {A, B}
    assert err["needed"] > err["available"]
    assert set(running(stack)) == {A, B}
    done(streams)


def test_a_load_is_not_admitted_into_room_a_loaded_models_conversations_may_fill(
        gov_stack, machine, config_dir) -> None:
    """Right after its load a model's KV pages and prompt cache are still empty; they fill
    as its conversations go on, so admission counts it at what it may grow to."""
    custom(config_dir, "  alpha-pinned:\n    base_model: alpha:40.0m-f32\n    pin: true\n")
    stack = gov_stack()
    pinned = "ms/alpha-pinned"
    use(stack, pinned)
    now, full = measured(stack)[pinned], held(stack)[pinned]
    assert full - now > 32 * MIB  # what its conversations may still fill
    # C fits beside what the pinned model holds now, not beside what it may grow to
    machine(total=int((now + need(stack, C) + (full - now) // 2) / 0.75))
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(C))
    assert status == 503, body
    assert "does not fit even with every unpinned model unloaded" in body["error"]["message"]
    assert set(running(stack)) == {pinned}


def test_a_load_that_could_never_fit_is_refused_at_once(gov_stack, machine) -> None:
    stack = gov_stack()
    use(stack, A)
    size = measured(stack)[A]
    # other programs hold most of the machine: not even D alone would fit
    machine(total=4 * size, base_used=int(2.5 * size))
    started = time.monotonic()
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(D))
    assert status == 503 and time.monotonic() - started < 10
    message = body["error"]["message"]
    assert "does not fit even with every unpinned model unloaded" in message
    assert "other programs hold" in message and body["error"]["other_programs"] > 0
    assert A in running(stack)  # nothing left for a load that could not happen


def test_loads_are_admitted_while_the_governor_is_stopped_or_broken(gov_stack, machine) -> None:
    stack = gov_stack()
    governor = stack.procs[2]
    governor.terminate()
    governor.wait(10)
    room_for_two(stack, machine)
    # something else on the governor's port that accepts and never answers
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", int(stack.env["GOVERNOR_PORT"])))
    squatter.listen()
    try:
        started = time.monotonic()
        use(stack, C)  # A, the least recently used, leaves for it
        assert time.monotonic() - started < 30
        assert set(running(stack)) == {B, C} and (A, "admission") in unloaded(stack)
        status, health = http("GET", stack.url + "/health")
        assert status == 200 and health["governor"]["status"] == "down"
    finally:
        squatter.close()


def test_a_blocked_unload_holds_up_no_other_load(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(A) in p.cmdline())
    child.suspend()  # it cannot end until it is let go on
    unloading: list = []
    unload = threading.Thread(target=lambda: unloading.append(
        http("POST", stack.url + "/models/unload", {"model": A}, timeout=120)))
    unload.start()
    try:
        wait(lambda: running(stack).get(A, {}).get("state") == "unloading", 20)
        use(stack, B)  # loads and answers while A's unload waits
        assert unload.is_alive() and B in running(stack)
        waiting = Ask(stack, A)  # A's next request waits for A to be gone, then loads it
        waiting.start()
        time.sleep(0.5)
        assert waiting.answer is None
    finally:
        child.resume()
    unload.join(60)
    waiting.join(60)
    assert waiting.answer[0] == 200, waiting.answer
    assert unloading[0][0] in (200, 503)  # done, or given up on after its bound
    assert all(reason != "crash" for _, reason in unloaded(stack))


def test_a_model_used_during_a_ttl_sweep_is_not_unloaded(gov_stack) -> None:
    """The policy decided on a reading in which the model was idle; a request came since."""
    stack = gov_stack()
    use(stack, A)
    key = stack.engine_headers["Authorization"].removeprefix("Bearer ")
    status, body = http("POST", stack.url + "/models/unload",
                        {"model": A, "reason": "ttl", "idle_at_least": 60},
                        {"X-Model-Serve-Key": key})
    assert status == 409 and body["error"]["code"] == "model_in_use"
    assert A in running(stack)
    status, _ = http("POST", stack.url + "/models/unload", {"model": A, "reason": "ttl"},
                     {"X-Model-Serve-Key": key})
    assert status == 200 and unloaded(stack) == [(A, "ttl")]


def test_requests_right_after_an_unload_load_the_model_again(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    unload = threading.Thread(target=lambda: http("POST", stack.url + "/models/unload",
                                                  {"model": A}))
    asks = [Ask(stack, A) for _ in range(4)]
    unload.start()
    time.sleep(0.05)
    for ask in asks:
        ask.start()
    unload.join(60)
    for ask in asks:
        ask.join(60)
        assert ask.answer[0] == 200, ask.answer
    assert unloaded(stack) == [(A, "manual")]  # and no crash
    loads = [e for e in events(stack) if e["kind"] == "loaded" and e["model"] == A]
    assert len(loads) == 2


def test_a_process_that_ends_unasked_is_a_crash_and_loads_again(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(A) in p.cmdline())
    os.kill(child.pid, signal.SIGKILL)
    wait(lambda: A not in running(stack), 10)  # its owner sees it go
    use(stack, A)
    assert unloaded(stack) == [(A, "crash")]
    assert len([e for e in events(stack) if e["kind"] == "loaded"]) == 2


def test_a_config_change_restarts_a_model_without_calling_it_a_crash(gov_stack,
                                                                    config_dir) -> None:
    stack = gov_stack()
    use(stack, A)
    use(stack, B)
    text = (config_dir / "custom_models.yaml").read_text()
    (config_dir / "custom_models.yaml").write_text(
        text.replace("alpha:40.0m-f32:\n    ctx_size: 1024",
                     "alpha:40.0m-f32:\n    ctx_size: 2048"))
    assert stack.cli("sync").returncode == 0
    wait(lambda: A not in running(stack), 30)
    time.sleep(1.5)  # the owner's next look
    assert unloaded(stack) == [(A, "config-restart")]
    assert B in running(stack)
    use(stack, A)
    assert running(stack)[A]["context_length"] == 2048


def test_a_raised_ctx_size_is_admitted_on_its_new_size(gov_stack, machine,
                                                       config_dir) -> None:
    stack = gov_stack()
    use(stack, A)
    size = measured(stack)[A]
    http("POST", stack.url + "/models/unload", {"model": A})
    machine(total=int(3 * size / 0.75))  # room for A as it was, not for 64 times its context
    text = (config_dir / "custom_models.yaml").read_text()
    (config_dir / "custom_models.yaml").write_text(
        text.replace("alpha:40.0m-f32:\n    ctx_size: 1024",
                     "alpha:40.0m-f32:\n    ctx_size: 65536"))
    assert stack.cli("sync").returncode == 0
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(A))  # at once
    assert status == 503, body
    assert body["error"]["needed"] > 3 * size
    assert A not in running(stack)


def test_memory_other_programs_hold_unloads_only_what_brings_use_under_the_limit(
        gov_stack, machine) -> None:
    stack = gov_stack()
    use(stack, A)
    use(stack, B)
    sizes = measured(stack)
    models = sizes[A] + sizes[B]
    total = 10 * models
    machine(total=total, base_used=int(0.75 * total) + 3 * models)  # nothing idle would help
    time.sleep(2)  # ten of the governor's checks
    assert set(running(stack)) == {A, B}
    system = http("GET", stack.url + "/running")[1]["system"]
    assert system["other_programs"] > 2 * models
    wait(lambda: "other programs hold" in ((governor_health(stack)["memory"] or {}).get(
        "note") or ""), 10)
    warnings = http("GET", stack.url + "/health")[1]["warnings"]
    assert any("other programs hold" in w for w in warnings)
    assert "other programs hold" in stack.cli("stats").stdout
    # over by less than A: A (the least recently used) leaves, B stays
    machine(total=total, base_used=int(0.75 * total) - models + sizes[A] // 2)
    wait(lambda: A not in running(stack), 20)
    time.sleep(1)
    assert B in running(stack) and unloaded(stack) == [(A, "pressure")]


def test_a_hung_model_answers_504_within_read_timeout_and_frees_its_slot(gov_stack) -> None:
    stack = gov_stack(READ_TIMEOUT="2")
    use(stack, A)
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(A) in p.cmdline())
    child.suspend()
    try:
        started = time.monotonic()
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(A), timeout=60)
        assert status == 504 and body["error"]["code"] == "model_timeout", body
        assert "READ_TIMEOUT" in body["error"]["message"] and time.monotonic() - started < 30
    finally:
        child.resume()
    use(stack, A)  # its slot is free again
