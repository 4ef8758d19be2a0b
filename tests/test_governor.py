"""The governor's decisions with real llama-server processes on models big enough to matter,
loaded as users load them (mmap). The machine's size is simulated (MEMORY_SIMULATION_FILE:
total and what everything else uses) so thresholds are deterministic; each model's memory is
measured from its real process. test_governor_memory.py runs on the machine's real memory."""

import json
import os
import signal
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import psutil
import pytest

from shared.engines.base import section_name
from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.streams import chat

MIB = 1024**2
A, B, C, D = (f"ms/{n}:{p}-f32" for n, p in
              (("alpha", "40.0m"), ("bravo", "40.0m"), ("charlie", "40.0m"), ("delta", "78.8m")))


@pytest.fixture(scope="session")
def big_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big")
    for name, mib in (("alpha", 150), ("bravo", 150), ("charlie", 150), ("delta", 300)):
        write_model(root / f"{name}-F32.gguf", name=name, n_embd=256, target_bytes=mib * MIB,
                    seed=len(name))
    return root


@pytest.fixture
def gov_models(tmp_path: Path, big_models: Path) -> Path:
    root = tmp_path / "models"
    for path in big_models.iterdir():
        folder = root / "pub" / path.stem
        folder.mkdir(parents=True)
        (folder / path.name).symlink_to(path)
    return root


def custom(config_dir: Path, extra: str = "") -> None:
    lines = ["models:"]
    for name, p in (("alpha", "40.0m"), ("bravo", "40.0m"), ("charlie", "40.0m"),
                    ("delta", "78.8m")):
        lines += [f"  {name}:{p}-f32:", "    ctx_size: 1024"]
    (config_dir / "custom_models.yaml").write_text("\n".join(lines) + "\n" + extra)


@pytest.fixture
def machine(tmp_path: Path):
    """Write the simulated machine: total bytes and what everything but the models uses."""
    file = tmp_path / "memory.json"

    def set_memory(total: int, base_used: int = 0) -> None:
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"total": total, "base_used": base_used}))
        tmp.replace(file)

    set_memory(10**15)
    set_memory.file = file
    return set_memory


@pytest.fixture
def gov_stack(stack_factory, tmp_path, gov_models, config_dir, machine, monkeypatch):
    custom(config_dir)

    def make(**env):
        stack = stack_factory(**{
            "MODELS_DIR": str(gov_models), "MEMORY_SIMULATION_FILE": str(machine.file),
            "PRESSURE_CHECK_INTERVAL": "0.2", "MIN_MODEL_AGE_SECONDS": "0", **env})
        return stack.start("engine", "proxy", "governor")
    return make


def running_system(stack) -> dict:
    return http("GET", stack.url + "/running")[1]["system"]


def running(stack) -> dict[str, dict]:
    return {m["id"]: m for m in http("GET", stack.url + "/running")[1]["models"]}


def use(stack, model: str) -> None:
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(model, max_tokens=2))
    assert status == 200, body


def measured(stack) -> dict[str, int]:
    """Each loaded model's measured memory, once every one has been measured."""
    for _ in range(100):
        got = {m: r["memory"]["measured"] for m, r in running(stack).items()}
        if all(got.values()):
            return got
        time.sleep(0.05)
    raise AssertionError(f"not measured: {got}")


def governor_health(stack) -> dict:
    return http("GET", f"http://127.0.0.1:{stack.env['GOVERNOR_PORT']}/health")[1]


def unloads(stack) -> list[str]:
    return [u["model"] for u in governor_health(stack)["unloads"]]



class Stream(threading.Thread):
    """A long streaming request kept in flight until stopped."""

    def __init__(self, stack, model: str, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.stack, self.model = stack, model
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.chunks = 0
        self.started = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        host, port = self.stack.url.removeprefix("http://").split(":")
        conn = HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat(
            self.model, max_tokens=1000, stream=True, ignore_eos=True)), self.headers)
        resp = conn.getresponse()
        while not self.stop.is_set():
            if not resp.readline():
                break
            self.chunks += 1
            if self.chunks >= 3:
                self.started.set()
        conn.close()


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
    assert "nothing idle to unload" in (stack.root / "governor.log").read_text()


def test_admission_makes_room_then_refuses_when_busy_models_leave_none(gov_stack,
                                                                      machine) -> None:
    stack = gov_stack()
    use(stack, A)
    use(stack, B)
    sizes = measured(stack)
    r = max(sizes.values())
    # A and B fit; D (300 MiB file) fits only if one of them leaves
    limit = 1.5 * r + 420 * MIB
    machine(total=int(limit / 0.75))
    use(stack, D)
    assert set(running(stack)) == {B, D} and unloads(stack) == [A]

    streams = [Stream(stack, m) for m in (B, D)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(C))
    assert status == 503, body
    err = body["error"]
    assert err["code"] == "insufficient_memory" and "not enough memory to load" in err["message"]
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
    assert governor_health(stack)["admissions"] == 1


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
    machine(total=10 * 1024**3, base_used=10 * 1024**3)  # full: everything idle must go
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
    machine(total=10 * 1024**3, base_used=10 * 1024**3)
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
    machine(total=10 * 1024**3, base_used=10 * 1024**3)  # over the threshold at once
    wait(lambda: A not in running(stack))
    assert time.monotonic() - started > 2  # a load counts as a use


def test_a_model_whose_process_ended_is_loaded_again_through_admission(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    admissions = governor_health(stack)["admissions"]
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(A) in p.cmdline())
    child.kill()
    # once the engine has seen it go; the proxy may still think it warm (the engine then
    # says "not loaded") or know already: either way the request loads it through admission
    wait(lambda: {m["id"]: m["status"]["value"] for m in http(
        "GET", stack.engine_url + "/models", headers=stack.engine_headers)[1]["data"]}[
            section_name(A)] == "unloaded")
    use(stack, A)
    assert governor_health(stack)["admissions"] == admissions + 1


def test_footprints_are_learned_and_kept_for_the_next_estimate(gov_stack) -> None:
    stack = gov_stack()
    use(stack, A)
    real = measured(stack)[A]
    file = stack.state_dir / "footprints.json"
    key = f"engine:{A}"
    wait(lambda: file.exists() and key in json.loads(file.read_text()))
    assert json.loads(file.read_text())[key]["bytes"] >= real * 0.9
    assert running(stack)[A]["memory"]["estimated"] == json.loads(file.read_text())[key]["bytes"]


def test_serving_goes_on_without_the_governor_and_it_picks_up_again(gov_stack,
                                                                    machine) -> None:
    stack = gov_stack()
    governor = stack.procs[2]
    governor.terminate()
    governor.wait(10)
    use(stack, A)  # admission cannot be asked: the load goes ahead
    use(stack, B)
    assert "without admission" in (stack.root / "proxy.log").read_text()
    status, health = http("GET", stack.url + "/health")
    assert status == 200 and health["status"] == "degraded"
    assert health["governor"]["status"] == "down" and "without memory admission" in \
        health["governor"]["problem"]
    assert running_system(stack)["governor"] == "down"
    stack.start("governor", wait=False)
    sizes = measured(stack)
    machine(total=int(sum(sizes.values()) / 0.80), base_used=sizes[A])
    wait(lambda: A not in running(stack))  # it found both from /running; A is the oldest


def test_a_hung_governor_is_given_up_on_and_the_proxy_loads_itself(gov_stack) -> None:
    stack = gov_stack()
    governor = stack.procs[2]
    os.kill(governor.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        use(stack, A)
        assert time.monotonic() - started < 20
        assert "without admission" in (stack.root / "proxy.log").read_text()
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
