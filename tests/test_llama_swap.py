"""The llama-swap adapter and the stack on the real llama-swap (tests/real_engines.py finds it;
without it these tests skip, saying where they looked), running real llama-server processes.
What v250 answers is recorded in ../shared/tools/real-engines/llama-swap-conformance."""

import asyncio
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import aiohttp
import psutil
import pytest
import yaml
from aiohttp import web

from services.proxy.models.engine_hold import Hold
from shared import settings as settings_mod
from shared.catalog import Catalog, Entry
from shared.engines import EngineError
from shared.engines.llama_swap import LlamaSwap, loader_refusals, model_ports
from shared.sync import rebuild
from shared.tiny_gguf import write_model
from tests.harness import Stack, free_port, http, wait
from tests.real_engines import llama_swap, llama_swap_bin_dir
from tests.streams import chat, stream_chat, stream_events

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
SLOW, NEW = "ms/slow:33.8m-f32", "ms/new:0.2m-f32"


def on_llama_swap(stack_factory, tmp_path: Path, **env: str) -> Stack:
    path = f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    return stack_factory(ENGINE="auto", PATH=path, **env)


@pytest.fixture
def stack(stack_factory, config_dir, tmp_path):
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    sampler_args: --temp 0.3\n    aliases: [tiny:latest]\n"
        "    max_concurrent: 12\n")
    return on_llama_swap(stack_factory, tmp_path).start()


SLOW_SETTINGS = "models:\n  slow:33.8m-f32:\n    sampler_args: --threads 1\n"


@pytest.fixture
def slow(models_dir: Path, config_dir: Path) -> None:
    """A model that generates 100-200 tokens a second: its answers take seconds. One thread:
    two slow to a crawl while other tests share the cores."""
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    (config_dir / "custom_models.yaml").write_text(SLOW_SETTINGS)


def states(stack) -> dict[str, str]:
    return {m["id"]: m["status"] for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def adapter(stack) -> tuple[LlamaSwap, Catalog]:
    settings = settings_mod.load(stack.env)
    return LlamaSwap(settings), Catalog.from_json(settings.catalog_file.read_text())


def test_models_load_side_by_side_and_unload_one_at_a_time(stack) -> None:
    assert http("GET", stack.url + "/health")[1]["engine"]["name"] == "llama-swap"
    for model in (TINY, OTHER, "tiny:latest"):
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(model))
        assert status == 200 and body["model"] == model, body
    events = stream_chat(stack.url, OTHER, 8, ignore_eos=True)
    assert {e["model"] for e in events} == {OTHER}
    assert states(stack) == {TINY: "loaded", OTHER: "loaded"}
    engine, catalog = adapter(stack)

    async def unload_and_load() -> None:
        async with aiohttp.ClientSession() as session:
            await engine.unload(session, catalog.entries[TINY])
            assert await engine.loaded(session, catalog) == {OTHER: "loaded"}
            loading = asyncio.create_task(engine.load(session, catalog.entries[TINY]))
            seen = set()
            while not loading.done():  # llama-swap's `starting` until its /health answers
                seen.add((await engine.loaded(session, catalog)).get(TINY))
                await asyncio.sleep(0.02)
            await loading
            assert "loading" in seen
            running = await engine.running(session, catalog)
        # ports count up from this stack's startPort in sorted-id order
        ports = model_ports(engine.settings)
        assert yaml.safe_load(engine.config_path.read_text())["startPort"] == ports.start
        assert {mid: r.port for mid, r in running.items()} == {
            OTHER: ports.start, TINY: ports.start + 1}

    asyncio.run(unload_and_load())


def test_llama_swap_answers_as_the_real_one_and_the_stack_copes(stack) -> None:
    engine, catalog = adapter(stack)
    url, key = stack.engine_url, stack.engine_headers
    status, body = http("GET", url + "/health")  # no key needed, text
    assert (status, body) == (200, "OK")
    assert http("POST", url + "/v1/chat/completions", chat("ms/nope"), key) == (
        404, {"error": "no router for requested model", "src": "llama-swap"})
    assert http("POST", url + "/v1/chat/completions", b"{not json", key) == (
        404, {"error": "no model id could be identified", "src": "llama-swap"})
    assert http("POST", url + "/api/models/unload/ms%2Fnope", b"", key)[0] == 404

    async def upstream_and_unloads() -> None:
        async with aiohttp.ClientSession(headers=key) as session:
            async with session.get(f"{url}/upstream/{TINY}", allow_redirects=False) as r:
                assert (r.status, r.headers["Location"]) == (301, f"/upstream/{TINY}/")
            await engine.load(session, catalog.entries[TINY])
            # an id the config no longer has is not loaded: nothing to unload
            await engine.unload(session, Entry(id="ms/gone", path=""))
            async with session.post(url + "/api/models/unload") as r:  # every model
                assert r.status == 200
            assert await engine.loaded(session, catalog) == {}

    asyncio.run(upstream_and_unloads())

    async def load_tiny() -> None:
        async with aiohttp.ClientSession() as session:
            await engine.load(session, catalog.entries[TINY])

    # the real failure of two stacks sharing ports: the model's server exits at start
    ports = model_ports(engine.settings)
    with socket.create_server(("127.0.0.1", ports.start + 1)):  # TINY's port
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
        assert status == 500, body
        assert "upstream command exited prematurely" in body["error"]["message"]
        with pytest.raises(EngineError, match=f"ports {ports.start}-{ports.stop - 1}: a "
                                              "program holding one of them"):
            asyncio.run(load_tiny())


def test_each_stack_has_its_own_model_ports(tmp_path) -> None:
    def ports(**env: str) -> range:
        return model_ports(settings_mod.load(env, env_file=tmp_path / "none"))

    default = ports()
    assert not {5846, 5847, 5848} & set(default) and default.stop <= 32768
    assert not set(default) & set(ports(LLAMA_SWAP_PORT="5857", HARMONY_PROXY_PORT="5856",
                                        GOVERNOR_PORT="5858"))
    inside = str(default.start + 7)  # one of the stack's own ports in its block: another one
    moved = ports(HARMONY_PROXY_PORT=inside)
    assert int(inside) not in moved and len(moved) == len(default)

    # one model more than the block holds: the last in llama-swap's order is left out
    engine = LlamaSwap(settings_mod.load({"STATE_DIR": str(tmp_path)}, tmp_path / "none"))
    many = [f"ms/m{i:03}" for i in range(len(default) + 1)]
    refused = engine.refusals(Catalog(entries={m: Entry(id=m, path="/m.gguf") for m in many}))
    assert list(refused) == [many[-1]]
    assert f"this stack's 320 ({default.start}-{default.stop - 1}" in refused[many[-1]]


REFUSALS = {
    "cmd without ${PORT}": ({"b": {"cmd": "llama-server --port 5999"}}, {},
                           "its command has no ${PORT}"),
    "alias used twice": ({"a": {"aliases": ["x"]}, "b": {"aliases": ["x"]}}, {},
                         "'x' is already a's name"),
    "model in two groups": ({}, {"other": {"members": ["b"]}}, "groups g and other"),
    "negative ttl": ({"b": {"ttl": -5}}, {}, "ttl -5 is negative"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_model_llama_swap_would_refuse_is_left_out_not_the_whole_config(tmp_path,
                                                                          case) -> None:
    changes, groups, reason = REFUSALS[case]
    models = {mid: {"cmd": "llama-server --port ${PORT}", **changes.get(mid, {})}
              for mid in ("a", "b")}
    config = {"models": models, "groups": {"g": {"members": ["a", "b"]}, **groups}}
    file = tmp_path / "llama-swap.yaml"
    file.write_text(yaml.safe_dump(config))
    start = subprocess.run([llama_swap(), "--config", file, "--listen",
                            f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                           timeout=30)
    assert start.returncode == 1 and "failed to load config" in start.stderr
    refused = loader_refusals(config, Path("custom_models.yaml"))
    assert list(refused) == ["b"] and reason in refused["b"], refused
    assert "llama-swap refuses a whole config for one such model" in refused["b"]


def test_running_states_are_loading_and_loaded_and_stopping_is_gone(tmp_path) -> None:
    """`stopping` lasts as long as a model's server takes to end: a made-up /running shows it."""
    port = free_port()
    engine = LlamaSwap(settings_mod.load({"STATE_DIR": str(tmp_path), "LLAMA_SWAP_PORT": str(port)},
                                         env_file=tmp_path / "none"))
    running = {"running": [
        {"model": "a", "state": "starting", "proxy": "http://localhost:16001"},
        {"model": "b", "state": "ready", "proxy": "http://localhost:16002"},
        {"model": "c", "state": "stopping", "proxy": "http://localhost:16003"}]}

    async def answer(_: web.Request) -> web.Response:
        return web.json_response(running)

    async def loaded() -> dict[str, str]:
        app = web.Application()
        app.router.add_get("/running", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                return await engine.loaded(session, Catalog())
        finally:
            await runner.cleanup()

    assert asyncio.run(loaded()) == {"a": "loading", "b": "loaded"}


def test_a_sync_returns_once_llama_swap_serves_the_new_config(stack, config_dir) -> None:
    body = http("POST", stack.url + "/v1/chat/completions", chat(TINY, verbose=True))[1]
    assert body["__verbose"]["generation_settings"]["temperature"] == pytest.approx(0.3)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    sampler_args: --temp 0.8\n")
    result = stack.cli("sync")
    assert result.returncode == 0 and "updated and reloaded" in result.stdout, result.stderr
    assert f"llama-swap stopped every loaded model to take up its new config: {TINY}" \
        in result.stderr
    # no waiting here: the sync returned once llama-swap had the new config
    body = http("POST", stack.url + "/v1/chat/completions", chat(TINY, verbose=True))[1]
    assert body["__verbose"]["generation_settings"]["temperature"] == pytest.approx(0.8)
    # a new alias answers at once: the proxy asks llama-swap by id, which it already knows
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    sampler_args: --temp 0.8\n    aliases: [fresh]\n")
    assert stack.cli("sync").returncode == 0
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("fresh"))
    assert status == 200 and body["model"] == "fresh"

    # a model the proxy offers before llama-swap's next look at its file loads all the same
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  creative:\n    base_model: tiny:0.2m-f32\n")
    settings = settings_mod.load(stack.env)
    engine = LlamaSwap(settings)
    creative = rebuild(settings, engine).catalog.entries["ms/creative"]

    async def load_then_refused_config() -> None:
        async with aiohttp.ClientSession() as session:
            await engine.load(session, creative)
            assert (await engine.loaded(session, Catalog()))["ms/creative"] == "loaded"
            # a config llama-swap refuses: it keeps the old one, and the reload says so
            config = yaml.safe_load(engine.config_path.read_text())
            config["models"]["ms/new"] = {**config["models"][TINY], "aliases": ["x"]}
            config["models"][OTHER]["aliases"] = ["x"]
            engine.config_path.write_text(yaml.safe_dump(config))
            with pytest.raises(EngineError, match="keeps its old config when it refuses"):
                await engine.reload(session, timeout=3)

    asyncio.run(load_then_refused_config())
    listed = http("GET", stack.engine_url + "/v1/models", headers=stack.engine_headers)[1]
    assert [m["id"] for m in listed["data"]] == ["ms/creative", OTHER, TINY]


def test_the_models_servers_want_the_key_and_take_all_the_queue_lets_by(stack) -> None:
    """v250 relays every header, the key too, so the models' own servers require it; past a
    model's `concurrencyLimit` requests in flight (10 unless set) it answers 429, and tiny's
    max_concurrent is 12."""
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    key = stack.engine_headers
    running = http("GET", stack.engine_url + "/running", headers=key)[1]["running"]
    own = next(item["proxy"] for item in running if item["model"] == TINY)
    assert http("POST", own + "/v1/chat/completions", chat(TINY))[0] == 401
    assert http("POST", own + "/v1/chat/completions", chat(TINY), key)[0] == 200
    through = f"{stack.engine_url}/upstream/{quote(TINY, safe='')}/v1/chat/completions"
    body = chat(TINY, max_tokens=200, ignore_eos=True)
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: http("POST", through, body, key)[0], range(12)))
    assert statuses == [200] * 12


def test_a_stream_under_way_when_a_new_model_appears_ends_whole(stack_factory, tmp_path,
                                                                models_dir, slow) -> None:
    """The sync service sees the new file. llama-swap's reload stops every model, so the proxy
    holds new requests and lets the stream finish first; the held request then loads its
    model again. (A loaded machine makes the stream slow: DRAIN_SECONDS leaves it time.)"""
    stack = on_llama_swap(stack_factory, tmp_path, DRAIN_SECONDS="120").start(
        "engine", "proxy", "sync")
    assert http("POST", stack.url + "/models/load", {"model": SLOW})[0] == 200
    assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
    log = stack.root / "proxy.log"
    with ThreadPoolExecutor(3) as pool:
        stream = pool.submit(stream_chat, stack.url, SLOW, 800, ignore_eos=True)
        time.sleep(0.5)
        write_model(models_dir / "pub" / "new" / "new-F32.gguf", name="new", seed=5)
        wait(lambda: "requests for the engine's models wait" in log.read_text()
             or stream.done(), 60)
        held = pool.submit(http, "POST", stack.url + "/v1/chat/completions", chat(TINY))
        # the new model itself, asked for while the config that brings it waits to be taken
        # up: held too, not a 404
        newcomer = pool.submit(http, "POST", stack.url + "/v1/chat/completions", chat(NEW))
        events = stream.result()  # without its [DONE] (cut short) this raises
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert held.result()[0] == 200
        status, body = newcomer.result()
        assert status == 200 and body["model"] == NEW
    metrics = http("GET", stack.url + "/metrics")[1].replace('backend="engine",', "")
    assert f'model="{SLOW}",reason="engine-reload"' in metrics
    assert 'reason="crash"' not in metrics


def test_the_hold_lets_requests_under_way_finish_for_at_most_drain_seconds() -> None:
    async def go() -> None:
        hold, seen = Hold(), []

        async def request(name: str, seconds: float) -> None:
            async with hold.passage():
                seen.append(name)
                await asyncio.sleep(seconds)

        under_way = asyncio.create_task(request("under way", 0.2))
        await asyncio.sleep(0)
        async with hold.held(drain=5) as left:
            assert left == 0 and under_way.done()  # it finished first
            new = asyncio.create_task(request("new", 0))
            await asyncio.sleep(0.1)
            assert seen == ["under way"]  # held
        await new
        assert seen == ["under way", "new"]
        stuck = asyncio.create_task(request("stuck", 30))
        await asyncio.sleep(0)
        started = time.monotonic()
        async with hold.held(drain=0.2) as left:
            assert left == 1 and time.monotonic() - started < 1
        stuck.cancel()

    asyncio.run(go())


def test_an_alias_only_change_answers_within_seconds_of_model_sync(stack_factory, tmp_path,
                                                                   config_dir, slow) -> None:
    """llama-swap takes up its file up to 2 s after it changes, stopping every model: `model
    sync` returns only once it serves the new config, so a request sent then is not cut."""
    stack = on_llama_swap(stack_factory, tmp_path).start()
    assert http("POST", stack.url + "/models/load", {"model": SLOW})[0] == 200
    (config_dir / "custom_models.yaml").write_text(SLOW_SETTINGS + "    aliases: [quick]\n")
    result = stack.cli("sync")
    assert "updated and reloaded" in result.stdout, result.stderr
    synced = time.monotonic()
    # long enough to be under way when llama-swap reloads, if it had yet to
    events = stream_events(stack.url, "quick", 500, ignore_eos=True)
    assert next(events)["model"] == "quick" and time.monotonic() - synced < 10
    assert list(events)[-1]["choices"][0]["finish_reason"] == "length"


def test_a_model_whose_server_died_is_loaded_again_by_its_owner_not_by_llama_swap(
        stack) -> None:
    """llama-swap starts a model on any request for it: a request that finds the model's
    server gone must go back to the proxy's owner of the model (a load through admission,
    counted, the leaving named a crash), not to llama-swap's /upstream."""
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY, max_tokens=2))[0] == 200
    engine = psutil.Process(stack.procs[0].pid)
    server = next(p for p in engine.children(recursive=True)
                  if any("tiny" in part for part in p.cmdline()) and "--port" in p.cmdline())
    server.kill()
    server.wait(10)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY, max_tokens=2))
    assert status == 200, body
    events = http("GET", stack.url + "/events")[1]["events"]
    assert [(e["kind"], e.get("reason")) for e in events if e["model"] == TINY] == [
        ("loading", None), ("loaded", None), ("unloaded", "crash"), ("loading", None),
        ("loaded", None)]
