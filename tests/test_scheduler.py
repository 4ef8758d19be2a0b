"""The governor's loop on decision logic alone: the proxy and the engine are small HTTP
servers of the test's (each failure can be forced) and the machine's size is simulated
(MEMORY_SIMULATION_FILE). Real processes and real memory are in test_governor.py and
test_governor_memory.py."""

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.governor.scheduler import Scheduler
from shared import settings as settings_mod
from shared.catalog import Catalog, Entry
from shared.catalog_holder import CatalogHolder
from shared.engines import make_engine
from shared.engines.base import section_name
from shared.memory import first_estimate
from shared.ollama import Ollama
from shared.pressure_signals import Signal
from shared.proxy_client import ProxyClient

MIB = 1024**2
A, B = "ms/a:1m-f32", "ms/b:1m-f32"
INFO = {"block_count": 2, "head_count_kv": 4, "key_length": 16, "value_length": 16,
        "feed_forward_length": 256, "embedding_length": 64}
ENTRY = Entry(id=A, path=f"/m/{A}.gguf", size_bytes=100 * MIB, ctx_size=1024, info=INFO)


class NoSignals:
    missing: list[str] = []

    def sample(self) -> list:
        return []


def row(mid: str, mib: int, idle: float = 60, in_flight: int = 0) -> dict:
    return {"id": mid, "name": mid, "backend": "engine", "state": "loaded",
            "last_used": time.time() - idle, "in_flight": in_flight, "pinned": False,
            "ttl": 1800, "memory": {"measured": mib * MIB, "reclaimable": 0}}


def answer(status: int = 200, **body) -> web.Response:
    return web.json_response(body, status=status)


class Fake:
    """A real HTTP server standing for the proxy or the engine: each route answers with
    the test's function and records its calls."""

    def __init__(self, routes: dict) -> None:
        self.app = web.Application()
        self.calls: dict[str, int] = {}
        self.bodies: dict[str, list] = {}
        for (method, path), handler in routes.items():
            self.app.router.add_route(method, path, self._counted(path, handler))
        self.server = TestServer(self.app, host="127.0.0.1")

    def _counted(self, path, handler):
        async def handle(request: web.Request) -> web.Response:
            self.calls[path] = self.calls.get(path, 0) + 1
            if request.can_read_body:
                self.bodies.setdefault(path, []).append(await request.json())
            return handler(request)
        return handle


async def governor(tmp_path, total: int, proxy: dict, engine: dict | None = None,
                   base: int = 0) -> tuple[Scheduler, list[Fake]]:
    """A scheduler whose machine is `total` bytes with `base` used besides the models."""
    fakes = [Fake(proxy), Fake(engine or {})]
    for fake in fakes:
        await fake.server.start_server()
    machine = tmp_path / "machine.json"
    machine.write_text(json.dumps({"total": total, "base_used": base}))
    settings = settings_mod.load({
        "STATE_DIR": str(tmp_path / "state"), "MEMORY_SIMULATION_FILE": str(machine),
        "PRESSURE_CHECK_INTERVAL": "0.05", "MIN_MODEL_AGE_SECONDS": "0",
        "HARMONY_PROXY_PORT": str(fakes[0].server.port),
        "LLAMA_SWAP_PORT": str(fakes[1].server.port), "GOVERNOR_PORT": "1",
        "OLLAMA_BASE": "http://127.0.0.1:9", "ENGINE": "router", "LLAMA_SERVER": "/bin/true"},
        env_file=tmp_path / "no.env")
    holder = CatalogHolder(settings)
    holder.catalog = Catalog({m: Entry(id=m, path=f"/m/{m}.gguf", size_bytes=100 * MIB,
                                       ctx_size=1024, info=INFO) for m in (A, B)})
    session = aiohttp.ClientSession()
    return Scheduler(settings, ProxyClient(settings.proxy_url, session), holder,
                     make_engine(settings), Ollama(settings.ollama_base, session), session,
                     NoSignals()), fakes


async def wait_for(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def stop(scheduler: Scheduler, task: asyncio.Task, fakes: list[Fake]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await scheduler.session.close()
    for fake in fakes:
        await fake.server.close()


def test_the_loop_survives_a_500_from_running_and_says_it_is_degraded(tmp_path) -> None:
    async def go() -> None:
        calls = []

        def running(request):
            calls.append(1)
            if len(calls) <= 3:
                return web.Response(status=500, text="500 Internal Server Error")
            return answer(models=[], system={})

        s, fakes = await governor(tmp_path, 10**12, {("GET", "/running"): running})
        task = asyncio.create_task(s.run())
        await wait_for(lambda: s.problem is not None)
        assert "GET /running: HTTP 500" in s.problem
        await wait_for(lambda: len(calls) > 3 and s.problem is None)
        assert not task.done()  # the loop went on
        assert s.memory["total"] == 10**12 and s.memory["used_pct"] == 0
        await stop(s, task, fakes)

    asyncio.run(go())


def test_a_failing_unload_backs_off_instead_of_starving_admission(tmp_path, caplog) -> None:
    async def go() -> None:
        # A alone is over the 75% threshold; its unload keeps failing (a backend error)
        s, fakes = await governor(tmp_path, 120 * MIB, {
            ("GET", "/running"): lambda r: answer(models=[row(A, 100)]),
            ("POST", "/models/unload"): lambda r: answer(
                503, error={"message": "Ollama is not reachable"})})
        task = asyncio.create_task(s.run())
        await asyncio.sleep(1.5)
        # admission still answers at once: B cannot fit, and A cannot leave
        started = time.monotonic()
        verdict = await asyncio.wait_for(s.load(("engine", B)), 5)
        assert time.monotonic() - started < 1
        assert verdict["loaded"] is False and verdict["error"]["code"] == "insufficient_memory"
        # 0.05 s ticks for 1.5 s: ~30 attempts without backing off; 0.1, 0.2, 0.4, 0.8 s
        unloads = fakes[0].calls["/models/unload"]
        assert 2 <= unloads <= 7, unloads
        await stop(s, task, fakes)
        assert "next try in" in caplog.text

    asyncio.run(go())


def test_every_waiter_on_a_refused_load_gets_its_own_answer(tmp_path) -> None:
    async def go() -> None:
        s, fakes = await governor(tmp_path, int(first_estimate(ENTRY) * 0.9 / 0.75),
                                  {("GET", "/running"): lambda r: answer(models=[])})
        task = asyncio.create_task(s.run())
        verdicts = await asyncio.gather(*(s.load(("engine", A)) for _ in range(5)))
        await stop(s, task, fakes)
        assert len({id(v) for v in verdicts}) == 5
        for v in verdicts:
            err = v["error"]
            assert (v["loaded"], err["status"], err["code"]) == (False, 503,
                                                                 "insufficient_memory")
            assert err["needed"] > err["available"]
            assert "does not fit even with every model unloaded" in err["message"]
            assert "MEMORY_PRESSURE_THRESHOLD" in err["message"]

    asyncio.run(go())


def test_one_load_for_many_waiters_and_each_hears_the_engines_reason(tmp_path) -> None:
    async def go() -> None:
        failed = {"id": section_name(A), "status": {"value": "unloaded", "failed": True,
                                                    "exit_code": 1}}
        s, fakes = await governor(tmp_path, 10**12,
                                  {("GET", "/running"): lambda r: answer(models=[])},
                                  {("POST", "/models/load"): lambda r: answer(success=True),
                                   ("GET", "/models"): lambda r: answer(data=[failed])})
        task = asyncio.create_task(s.run())
        verdicts = await asyncio.gather(*(s.load(("engine", A)) for _ in range(4)))
        await stop(s, task, fakes)
        assert fakes[1].calls["/models/load"] == 1
        for v in verdicts:
            assert v["loaded"] is False and v["error"]["status"] == 500
            assert f"model {A} failed to load (exit code 1)" in v["error"]["message"]
            assert f"/m/{A}.gguf" in v["error"]["message"]
        assert not s.loads  # a failed load reserves nothing

    asyncio.run(go())


def test_a_reservation_ends_when_its_model_leaves_before_it_is_measured(tmp_path) -> None:
    """Unloaded right after its load, before any measurement: what it reserved is free again
    (not held for MEASURE_WAIT)."""
    async def go() -> None:
        rows: list[dict] = []
        loaded = {"id": section_name(A), "status": {"value": "loaded"}}
        s, fakes = await governor(tmp_path, 10**12,
                                  {("GET", "/running"): lambda r: answer(models=rows)},
                                  {("POST", "/models/load"): lambda r: answer(success=True),
                                   ("GET", "/models"): lambda r: answer(data=[loaded])})
        task = asyncio.create_task(s.run())
        assert (await s.load(("engine", A)))["loaded"] is True
        rows.append({**row(A, 0), "memory": {"measured": None, "reclaimable": None}})
        await asyncio.sleep(0.3)  # checks that see it loaded and not measured: still held
        assert s.memory["reserved"] == s.loads[("engine", A)].need > 0
        rows.clear()  # unloaded, never measured
        await wait_for(lambda: s.memory["reserved"] == 0 and not s.loads)
        await stop(s, task, fakes)

    asyncio.run(go())


def test_a_reservation_holds_memory_until_the_model_is_measured(tmp_path) -> None:
    """Two cold loads of different models cannot both be admitted against the same free
    memory: the first one's estimate stays reserved while it loads."""
    async def go() -> None:
        need = first_estimate(ENTRY)
        loading = {"id": section_name(A), "status": {"value": "loading"}}
        s, fakes = await governor(tmp_path, int(need * 1.5 / 0.75),  # room for one and a half
                                  {("GET", "/running"): lambda r: answer(models=[])},
                                  {("POST", "/models/load"): lambda r: answer(success=True),
                                   ("GET", "/models"): lambda r: answer(data=[loading])})
        task = asyncio.create_task(s.run())
        first = asyncio.create_task(s.load(("engine", A)))
        await wait_for(lambda: ("engine", A) in s.loads)
        second = await asyncio.wait_for(s.load(("engine", B)), 5)
        assert second["loaded"] is False and second["error"]["available"] < need
        await wait_for(lambda: s.memory is not None and s.memory["reserved"] == need)
        first.cancel()
        await stop(s, task, fakes)

    asyncio.run(go())


class Firing:
    """The OS saying memory is short, for as long as `on` is set."""

    missing = ["psi: not on this machine"]

    def __init__(self) -> None:
        self.on = True

    def sample(self) -> list:
        return [Signal("refault", 80.0 if self.on else 0.0, 32, " MiB/s", self.on)]


def test_a_pressure_signal_unloads_the_lru_idle_model_and_names_itself(tmp_path,
                                                                       caplog) -> None:
    async def go() -> None:
        rows = [row(A, 100, idle=30), row(B, 100, idle=90)]  # far under the threshold
        gone: list[str] = []

        def unload(request):
            gone.append(B if not gone else A)
            rows[:] = [r for r in rows if r["id"] not in gone]
            return answer(model=gone[-1], unloaded=True)

        s, fakes = await governor(tmp_path, 10**12, {
            ("GET", "/running"): lambda r: answer(models=rows),
            ("POST", "/models/unload"): unload})
        s.signals = Firing()
        task = asyncio.create_task(s.run())
        await wait_for(lambda: gone == [B])
        assert s.memory["firing"] == ["refault 80.0 MiB/s (level 32 MiB/s)"]
        assert s.unloads[0]["cause"] == "signal" and "refault 80.0 MiB/s" in \
            s.unloads[0]["reason"]
        # the proxy is told the cause, the signal (a metric's label) and the why (the events)
        told = fakes[0].bodies["/models/unload"][0]
        assert (told["model"], told["reason"], told["signal"]) == (B, "signal", "refault")
        assert told["detail"].startswith("pressure signal refault 80.0 MiB/s")
        await asyncio.sleep(1)  # the system gets time to recover before another may go
        assert gone == [B]
        s.signals.on = False
        await asyncio.sleep(3.5)
        assert gone == [B] and s.memory["firing"] == []
        await stop(s, task, fakes)
        assert "pressure signal unavailable, going on without it: psi" in caplog.text

    asyncio.run(go())


def test_no_model_is_unloaded_for_a_load_that_could_not_fit_anyway(tmp_path) -> None:
    async def go() -> None:
        # limit 120 MiB, A (idle) holds 100 of it; B needs more than all 120
        s, fakes = await governor(tmp_path, int(120 * MIB / 0.75), {
            ("GET", "/running"): lambda r: answer(models=[row(A, 100)]),
            ("POST", "/models/unload"): lambda r: answer(model=A, unloaded=True)})
        assert first_estimate(ENTRY) > 120 * MIB
        task = asyncio.create_task(s.run())
        verdict = await asyncio.wait_for(s.load(("engine", B)), 5)
        await stop(s, task, fakes)
        assert verdict["error"]["code"] == "insufficient_memory"
        assert "does not fit even with every model unloaded" in verdict["error"]["message"]
        assert "/models/unload" not in fakes[0].calls

    asyncio.run(go())
