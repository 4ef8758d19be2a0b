"""Warm requests go straight to the model's own llama-server; the engine is the way back
when that server has gone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from http.client import HTTPConnection
from types import SimpleNamespace

import psutil

from services.proxy.manage.events import Events
from services.proxy.manage.metrics import Metrics
from services.proxy.models.owner import Owner
from services.proxy.models.usage import Usage
from shared import settings as settings_mod
from shared.catalog import Catalog, Entry
from shared.engines.base import Running, section_name
from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.streams import chat, stream_chat

TINY = "ms/tiny:0.2m-f32"
SLOW = "ms/slow:33.8m-f32"


def router(stack) -> psutil.Process:
    return next(p for p in psutil.Process(stack.procs[0].pid).children()
                if "llama-server" in p.name())


def model_process(stack, model: str) -> psutil.Process:
    return next(p for p in router(stack).children() if section_name(model) in p.cmdline())


def test_a_warm_model_answers_while_the_engine_does_not(stack_factory) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    engine = router(stack)
    os.kill(engine.pid, signal.SIGSTOP)  # the engine hears nothing now
    try:
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY), timeout=20)
        assert status == 200 and body["model"] == TINY
        assert stream_chat(stack.url, "tiny-0.2m-f32")[-1]["model"] == "tiny-0.2m-f32"
    finally:
        os.kill(engine.pid, signal.SIGCONT)


def test_a_model_server_gone_since_the_last_look_is_reached_through_the_engine(
        stack_factory) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    server = model_process(stack, TINY)
    port = next(c.laddr.port for c in server.net_connections() if c.status == "LISTEN")
    server.kill()
    # gone before the request: the proxy has seen its connections to the server close
    proxy = psutil.Process(stack.procs[1].pid)
    wait(lambda: not any(c.raddr and c.raddr.port == port for c in proxy.net_connections()))
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
    assert status == 200 and body["model"] == TINY  # loaded again, no error for the client


def test_a_client_that_leaves_a_plain_request_stops_the_model(stack_factory,
                                                              models_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    stack = stack_factory().start()
    assert http("POST", stack.url + "/models/load", {"model": SLOW})[0] == 200
    server = model_process(stack, SLOW)
    conn = HTTPConnection("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"]), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        chat(SLOW, max_tokens=100000, ignore_eos=True)), {"Content-Type": "application/json"})
    server.cpu_percent()
    time.sleep(1)
    assert server.cpu_percent() > 50  # generating
    conn.close()
    # llama-server looks at its client after a second without news; asking it (/slots)
    # would be news, so only its CPU is watched
    deadline = time.monotonic() + 30
    server.cpu_percent()
    while time.monotonic() < deadline:
        time.sleep(1.5)
        if server.cpu_percent() < 20:
            break
    else:
        raise AssertionError("the model kept generating for a client that left")


def test_a_model_that_left_at_its_ttl_answers_the_next_request(stack_factory,
                                                                config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text("models:\n  tiny:0.2m-f32:\n    ttl: 2\n")
    stack = stack_factory(PRESSURE_CHECK_INTERVAL="0.2", MIN_MODEL_AGE_SECONDS="0").start(
        "engine", "proxy", "governor")
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    first = model_process(stack, TINY)
    first.wait(30)  # gone at its TTL
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
    assert status == 200 and body["model"] == TINY
    assert model_process(stack, TINY).pid != first.pid  # loaded again
    assert stream_chat(stack.url, TINY)[-1]["model"] == TINY  # and warm: straight to it


class LateEngine:
    """An engine whose first answer to "what is loaded" arrives when the test lets it; later
    ones say nothing is (the model has been unloaded)."""

    starts_on_request = False
    headers: dict[str, str] = {}

    def __init__(self) -> None:
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def running(self, session, catalog) -> dict[str, Running]:
        if self.asked.is_set():
            return {}
        self.asked.set()
        await self.answer.wait()
        return {TINY: Running("loaded", 1234)}

    async def unload(self, session, entry) -> None:
        pass


def test_a_look_at_the_engine_from_before_an_unload_does_not_warm_the_model_again(
        tmp_path) -> None:
    async def go() -> None:
        engine = LateEngine()
        settings = settings_mod.load({"STATE_DIR": str(tmp_path)}, env_file=tmp_path / "no")
        entry = Entry(id=TINY, path="tiny.gguf")
        holder = SimpleNamespace(catalog=Catalog({TINY: entry}), refresh=lambda: False)
        owner = Owner(settings, engine, None, None, Usage(), Metrics(Events()), holder)
        key = ("engine", TINY)
        life = owner.life(key, TINY)
        life.state, life.entry, life.address = "warm", entry, "http://127.0.0.1:1234"
        look = asyncio.create_task(owner.look())
        await engine.asked.wait()  # the look has begun, the model still loaded
        assert await owner.unload(key, TINY, "manual") is None
        engine.answer.set()  # and it says so, after the unload
        await look
        # its next request loads it again (through the owner), not straight to a dead server
        assert not owner.warm(key) and owner.address(TINY) is None

    asyncio.run(go())
