"""Governed stacks for the tests of memory decisions: real llama-server processes on models
big enough to matter, loaded as users load them (mmap), on a machine whose size is simulated
(MEMORY_SIMULATION_FILE: total and what everything else uses) so thresholds are
deterministic; each model's memory is measured from its real process. Its fixtures are
every test module's (conftest.py names this module a plugin)."""

import json
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest

from shared.catalog import Catalog
from shared.memory import Footprints
from shared.tiny_gguf import write_model
from tests.harness import http
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


def held(stack) -> dict[str, int]:
    """What admission counts each loaded model as, once every one has been measured: its
    memory now or its estimate (what its conversations may grow it to), the larger."""
    sizes = measured(stack)
    return {m: max(size, running(stack)[m]["memory"]["estimated"] or 0)
            for m, size in sizes.items()}


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


def events(stack) -> list[dict]:
    return http("GET", stack.url + "/events")[1]["events"]


def unloaded(stack) -> list[tuple[str, str]]:
    """Each model that left, and why, as the proxy's events tell."""
    return [(e["model"], e["reason"]) for e in events(stack) if e["kind"] == "unloaded"]


def need(stack, model: str) -> int:
    """What the proxy reserves to load `model`: its learned footprint, else its first
    estimate, and its prompt cache."""
    entry = Catalog.from_json((stack.state_dir / "catalog.json").read_text()).entries[model]
    return Footprints(stack.state_dir / "footprints.json").estimate(f"engine:{model}", entry,
                                                                     "engine")
