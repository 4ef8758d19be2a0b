"""The governor's decisions with real llama-server processes on models big enough to matter,
loaded as users load them (mmap). The machine's size is simulated (MEMORY_SIMULATION_FILE:
total and what everything else uses) so thresholds are deterministic; each model's memory is
measured from its real process. test_governor_memory.py runs on the machine's real memory."""

import json
import os
import signal
import threading
import time

import psutil

from shared.catalog import Catalog
from shared.engines.base import section_name
from shared.memory import full_size, prompt_cache_bytes
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
    running_system,
    unloaded,
    unloads,
    use,
)
from tests.harness import http, wait
from tests.streams import chat


def test_pressure_unloads_the_least_recently_used_idle_model(gov_stack, machine) -> None:
    stack = gov_stack()
    for model in (A, B, C, A):
        use(stack, model)
    sizes = measured(stack)
    assert set(sizes) == {A, B, C} and all(s > 150 * MIB for s in sizes.values())
    # three models put the machine at 80% used; two would be well under 75%
    machine(total=int(sum(sizes.values()) / 0.80))
    wait(lambda: B not in running(stack))
    time.sleep(1)  # several more checks: nothing else goes
    assert set(running(stack)) == {A, C}
    assert unloads(stack) == [B]
    log = (stack.root / "governor.log").read_text()
    assert f"unloaded {B}" in log and "memory pressure 80.0% > 75%" in log


def test_busy_and_pinned_models_are_never_unloaded(gov_stack, machine, config_dir) -> None:
    custom(config_dir, "  charlie-pinned:\n    base_model: charlie:40.0m-f32\n    pin: true\n")
    stack = gov_stack()
    pinned = "ms/charlie-pinned"
    for model in (pinned, B, A):
        use(stack, model)
    stream = Stream(stack, B)  # B, the least recently used but for the pinned one, is busy
    stream.start()
    assert stream.started.wait(30)
    sizes = measured(stack)
    # above the threshold even once every idle model is gone
    machine(total=int(sum(sizes.values()) / 0.80), base_used=sizes[A])
    wait(lambda: A not in running(stack))
    time.sleep(1)
    assert set(running(stack)) == {pinned, B}  # still above the threshold, nothing idle left
    chunks = stream.chunks
    time.sleep(0.5)
    assert stream.chunks > chunks and stream.is_alive()  # B kept streaming throughout
    stream.stop.set()
    stream.join(10)
    assert "would not bring use under the limit, so none is unloaded" in \
        (stack.root / "governor.log").read_text()


def test_admission_makes_room_then_refuses_when_busy_models_leave_none_in_time(
        gov_stack, machine) -> None:
    stack = gov_stack(LOAD_WAIT="3")
    use(stack, A)
    use(stack, B)
    sizes = held(stack)
    r = max(sizes.values())
    # A and B fit; D (300 MiB file) fits only if one of them leaves
    limit = 1.5 * r + need(stack, D)
    machine(total=int(limit / 0.75))
    use(stack, D)
    assert set(running(stack)) == {B, D} and unloaded(stack) == [(A, "admission")]

    streams = [Stream(stack, m) for m in (B, D)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(C))
    assert status == 503, body
    err = body["error"]
    assert err["code"] == "insufficient_memory" and "not enough memory to load" in err["message"]
    assert "waited" in err["message"] and "LOAD_WAIT=3" in err["message"]
    assert err["needed"] > 150 * MIB and err["available"] < err["needed"]
    assert set(err["busy"]) == {B, D}
    assert set(running(stack)) == {B, D}
    for s in streams:
        s.stop.set()
        s.join(10)


def test_concurrent_first_requests_give_one_admission_and_one_load(gov_stack) -> None:
    stack = gov_stack()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        http("POST", stack.url + "/v1/chat/completions", chat(C, max_tokens=2))[0]))
        for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 6
    engine = psutil.Process(stack.procs[0].pid)
    children = [p for p in engine.children(recursive=True) if section_name(C) in p.cmdline()]
    assert len(children) == 1
    assert [e["kind"] for e in events(stack) if e["model"] == C] == ["loading", "loaded"]


def test_management_api_running_unload_load(gov_stack, tmp_path) -> None:
    stack = gov_stack(API_KEY="k")
    auth = {"Authorization": "Bearer k"}
    assert http("GET", stack.url + "/running")[0] == 401
    assert http("POST", stack.url + "/models/load", {"model": A}, auth)[1] == {
        "model": A, "loaded": True}
    row = {m["id"]: m for m in http("GET", stack.url + "/running", headers=auth)[1]["models"]}[A]
    assert row["backend"] == "engine" and row["state"] == "loaded" and row["in_flight"] == 0
    assert row["memory"]["measured"] > 150 * MIB and row["memory"]["estimated"] > 150 * MIB
    assert row["ttl"] == 1800 and row["context_length"] == 1024 and row["pinned"] is False

    stream = Stream(stack, A, auth)
    stream.start()
    assert stream.started.wait(30)
    status, body = http("POST", stack.url + "/models/unload", {"model": A}, auth)
    assert status == 409 and body["error"]["code"] == "model_busy"
    status, body = http("POST", stack.url + "/models/unload", {"model": A, "force": True}, auth)
    assert status == 200 and body["unloaded"] is True
    stream.join(30)
    wait(lambda: A not in {m["id"] for m in http("GET", stack.url + "/running",
                                                  headers=auth)[1]["models"]})
    status, body = http("POST", stack.url + "/models/unload", {"model": "ms/nope"}, auth)
    assert status == 404


def test_an_unload_asked_for_while_the_model_loads_unloads_it_once_loaded(gov_stack) -> None:
    """Unload clicked right after Load: the load answers loaded, then the model leaves; no
    failed load is reported for an unload."""
    stack = gov_stack()
    loading: list = []
    loader = threading.Thread(target=lambda: loading.append(
        http("POST", stack.url + "/models/load", {"model": A})))
    loader.start()
    wait(lambda: any(e["kind"] == "loading" for e in http("GET", stack.url + "/events")[1][
        "events"]), 30)
    status, body = http("POST", stack.url + "/models/unload", {"model": A})
    loader.join(60)
    assert loading[0] == (200, {"model": A, "loaded": True})
    assert (status, body["unloaded"]) == (200, True)
    kinds = [e["kind"] for e in http("GET", stack.url + "/events")[1]["events"]]
    assert kinds == ["loading", "loaded", "unloaded"]
    wait(lambda: A not in running(stack))


def ollama_gov_stack(gov_stack, real_ollama, *names: str):
    """A governed stack beside the real Ollama, with `names` made there and linked."""
    real_ollama.unload_all()
    for name in names:
        real_ollama.create(name, seed=len(name))
    stack = gov_stack(OLLAMA_BASE=real_ollama.url, OLLAMA_MODELS=str(real_ollama.store))
    assert stack.cli("sync").returncode == 0
    return stack


def test_ollama_models_take_part_in_the_same_lru_order(gov_stack, machine,
                                                       real_ollama) -> None:
    stack = ollama_gov_stack(gov_stack, real_ollama, "olla-mxfp4:1b")
    olla = "ms/olla-mxfp4:0.2m-f32"
    use(stack, olla)
    use(stack, A)
    rows = running(stack)
    assert rows[olla]["backend"] == "ollama" and rows[olla]["memory"]["measured"] > 0
    # just over the limit: everything idle must go to bring use under it
    machine(total=10 * 1024**3, base_used=int(0.75 * 10 * 1024**3) - MIB)
    wait(lambda: not running(stack))
    assert unloads(stack) == [olla, A]
    assert not real_ollama.loaded() and not real_ollama.runners()  # Ollama let it go


def test_a_model_ollama_holds_is_unloaded_from_ollama_whatever_the_catalog_says(
        gov_stack, machine, real_ollama) -> None:
    """An engine model whose Ollama twin another client loaded: the unload goes to Ollama,
    which holds it, once, instead of to the engine over and over."""
    stack = ollama_gov_stack(gov_stack, real_ollama, "plain:1b", "big-mxfp4:1b")
    plain = "ms/plain:0.2m-f32"
    assert http("POST", real_ollama.url + "/api/generate", {"model": "plain:1b"})[0] == 200
    wait(lambda: plain in running(stack))  # once the proxy has read the synced catalog
    rows = running(stack)
    assert rows[plain]["backend"] == "ollama" and rows[plain]["name"] == "plain:1b"
    machine(total=10 * 1024**3, base_used=int(0.75 * 10 * 1024**3) - MIB)
    wait(lambda: not running(stack))
    time.sleep(1)
    assert unloads(stack) == [plain]
    assert governor_health(stack)["status"] == "ok"
    assert not real_ollama.loaded()
    # a client cannot make Ollama reload a model at another context behind admission
    machine(total=10**15)
    status, body = http("POST", stack.url + "/v1/chat/completions",
                        {**chat("plain:1b"), "num_ctx": 65536})
    assert status == 200  # an engine model: num_ctx is not Ollama's there
    status, body = http("POST", stack.url + "/v1/chat/completions",
                        {**chat("big-mxfp4:1b"), "num_ctx": 65536})
    assert status == 400 and body["error"]["code"] == "context_fixed"
    assert "custom_models.yaml" in body["error"]["message"]


def test_a_model_loaded_without_a_request_keeps_the_minimum_age(gov_stack, machine) -> None:
    stack = gov_stack(MIN_MODEL_AGE_SECONDS="3")
    assert stack.cli("load", A).returncode == 0
    started = time.monotonic()
    # over the threshold at once, by less than the model
    machine(total=10 * 1024**3, base_used=int(0.75 * 10 * 1024**3) - MIB)
    wait(lambda: A not in running(stack))
    assert time.monotonic() - started > 2  # a load counts as a use


def test_a_model_whose_process_ended_is_loaded_again_by_its_owner(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(A) in p.cmdline())
    child.kill()
    # once the engine has seen it go; the proxy may still think it warm (the engine then
    # says "not loaded") or know already: either way the request loads it through admission
    wait(lambda: {m["id"]: m["status"]["value"] for m in http(
        "GET", stack.engine_url + "/models", headers=stack.engine_headers)[1]["data"]}[
            section_name(A)] == "unloaded")
    use(stack, A)
    assert [e["kind"] for e in events(stack)] == ["loading", "loaded", "unloaded", "loading",
                                                  "loaded"]
    assert unloaded(stack) == [(A, "crash")]


def test_footprints_are_learned_and_kept_for_the_next_estimate(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    real = measured(stack)[A]
    file = stack.state_dir / "footprints.json"
    key = f"engine:{A}"
    wait(lambda: file.exists() and key in json.loads(file.read_text()))
    assert json.loads(file.read_text())[key]["bytes"] >= real * 0.9
    # the footprint at load or, while its KV pages are untouched, its whole context's
    # size, and the prompt cache the stack lets it grow (--cache-ram)
    entry = Catalog.from_json((stack.state_dir / "catalog.json").read_text()).entries[A]
    assert prompt_cache_bytes(entry) > 0
    at_load = json.loads(file.read_text())[key]["bytes"]
    assert running(stack)[A]["memory"]["estimated"] == \
        max(at_load, full_size(entry)) + prompt_cache_bytes(entry)


def test_serving_goes_on_without_the_governor_and_it_picks_up_again(gov_stack,
                                                                    machine) -> None:
    stack = gov_stack()
    governor = stack.procs[2]
    governor.terminate()
    governor.wait(10)
    use(stack, A)  # loads are the proxy's: they go on as before
    use(stack, B)
    status, health = http("GET", stack.url + "/health")
    assert status == 200 and health["status"] == "degraded"
    assert health["governor"]["status"] == "down" and "past their TTL" in \
        health["governor"]["problem"]
    assert running_system(stack)["governor"] == "down"
    stack.start("governor", wait=False)
    sizes = measured(stack)
    machine(total=int(sum(sizes.values()) / 0.80), base_used=sizes[A])
    wait(lambda: A not in running(stack))  # it found both from /running; A is the oldest


def test_a_hung_governor_holds_up_no_load(gov_stack) -> None:
    stack = gov_stack()
    governor = stack.procs[2]
    os.kill(governor.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        use(stack, A)
        assert time.monotonic() - started < 20
        assert http("GET", stack.url + "/health")[1]["governor"]["status"] == "down"
    finally:
        os.kill(governor.pid, signal.SIGCONT)


def test_model_stats_load_and_unload_commands(gov_stack) -> None:
    stack = gov_stack()
    result = stack.cli("load", A)
    assert result.returncode == 0 and f"loaded {A}" in result.stdout, result.stderr
    stats = stack.cli("stats")
    assert stats.returncode == 0, stats.stderr
    assert A in stats.stdout and "engine" in stats.stdout and "MiB" in stats.stdout
    assert "system memory" in stats.stdout
    assert "note: Ollama is not reachable" in stats.stdout  # its models would be missing
    result = stack.cli("unload", A)
    assert result.returncode == 0 and f"unloaded {A}" in result.stdout
    assert "no models loaded" in stack.cli("stats").stdout
    assert stack.cli("unload", "ms/nope").returncode == 1
