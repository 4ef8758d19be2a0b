"""The governor's policy on decision logic alone: the proxy is a small HTTP server of the
test's (each failure can be forced, which the real proxy cannot be made to do on cue). Real
processes and real memory are in test_governor.py, test_model_life.py and
test_governor_memory.py."""

import asyncio
import time
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.governor.policy import Policy
from shared import settings as settings_mod
from shared.pressure_signals import Signal
from shared.proxy_client import ProxyClient

MIB = 1024**2
A, B = "ms/a:1m-f32", "ms/b:1m-f32"


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


def system(total: int, used: int) -> dict:
    """/running's `system` line for a machine of `total` bytes with `used` in use."""
    limit = int(total * 0.75)
    return {"total": total, "used": used, "limit": limit, "threshold_pct": 75.0,
            "used_pct": round(100 * used / total, 1), "other_programs": 0}


async def governor(tmp_path, proxy: dict) -> tuple[Policy, list[Fake]]:
    fakes = [Fake(proxy)]
    await fakes[0].server.start_server()
    settings = settings_mod.load({
        "STATE_DIR": str(tmp_path / "state"), "PRESSURE_CHECK_INTERVAL": "0.05",
        "MIN_MODEL_AGE_SECONDS": "0", "MEMORY_PRESSURE_THRESHOLD": "75",
        "HARMONY_PROXY_PORT": str(fakes[0].server.port),
        "GOVERNOR_PORT": "1", "ENGINE": "router", "LLAMA_SERVER": "/bin/true"},
        env_file=tmp_path / "no.env")
    session = aiohttp.ClientSession()
    policy = Policy(settings, ProxyClient(settings.proxy_url, session), NoSignals())
    policy.session = session
    return policy, fakes


async def wait_for(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def stop(policy: Policy, task: asyncio.Task, fakes: list[Fake]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await policy.session.close()
    for fake in fakes:
        await fake.server.close()


def test_the_loop_survives_a_500_from_running_and_says_it_is_degraded(tmp_path) -> None:
    async def go() -> None:
        calls = []

        def running(request):
            calls.append(1)
            if len(calls) <= 3:
                return web.Response(status=500, text="500 Internal Server Error")
            return answer(models=[], system=system(10**12, 0))

        s, fakes = await governor(tmp_path, {("GET", "/running"): running})
        task = asyncio.create_task(s.run())
        await wait_for(lambda: s.problem is not None)
        assert "GET /running: HTTP 500" in s.problem
        await wait_for(lambda: len(calls) > 3 and s.problem is None)
        assert not task.done()  # the loop went on
        assert s.memory["total"] == 10**12 and s.memory["used_pct"] == 0
        await stop(s, task, fakes)

    asyncio.run(go())


def test_a_failing_unload_backs_off(tmp_path, caplog) -> None:
    async def go() -> None:
        # A alone is over the limit; its unload keeps failing (a backend error)
        s, fakes = await governor(tmp_path, {
            ("GET", "/running"): lambda r: answer(models=[row(A, 100)],
                                                  system=system(120 * MIB, 100 * MIB)),
            ("POST", "/models/unload"): lambda r: answer(
                503, error={"message": "Ollama is not reachable"})})
        task = asyncio.create_task(s.run())
        await asyncio.sleep(1.5)
        # 0.05 s ticks for 1.5 s: ~30 attempts without backing off; 0.1, 0.2, 0.4, 0.8 s
        unloads = fakes[0].calls["/models/unload"]
        assert 2 <= unloads <= 7, unloads
        await stop(s, task, fakes)
        assert "next try in" in caplog.text

    asyncio.run(go())


def test_pressure_from_other_programs_unloads_nothing_that_cannot_help(tmp_path) -> None:
    async def go() -> None:
        line = {**system(1000 * MIB, 900 * MIB), "other_programs": 800 * MIB}
        s, fakes = await governor(tmp_path, {
            ("GET", "/running"): lambda r: answer(models=[row(A, 100)], system=line),
            ("POST", "/models/unload"): lambda r: answer(model=A, unloaded=True)})
        task = asyncio.create_task(s.run())
        await wait_for(lambda: (s.memory or {}).get("note"))
        await asyncio.sleep(0.3)
        assert "/models/unload" not in fakes[0].calls  # 150 MiB over; A frees 100
        assert "other programs hold 0.78 GiB" in s.memory["note"]
        await stop(s, task, fakes)

    asyncio.run(go())


def test_models_too_young_to_leave_are_waited_for_not_blamed_on_other_programs(
        tmp_path) -> None:
    async def go() -> None:
        line = system(1000 * MIB, 900 * MIB)  # 150 MiB over; A, just used, holds 200
        s, fakes = await governor(tmp_path, {
            ("GET", "/running"): lambda r: answer(models=[row(A, 200, idle=0.5)], system=line),
            ("POST", "/models/unload"): lambda r: answer(model=A, unloaded=True)})
        s.settings = replace(s.settings, min_model_age=60)
        task = asyncio.create_task(s.run())
        await wait_for(lambda: (s.memory or {}).get("note"))
        assert "/models/unload" not in fakes[0].calls
        assert f"waiting for {A} (used moments ago)" in s.memory["note"]
        assert "other programs" not in s.memory["note"]
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

        s, fakes = await governor(tmp_path, {
            ("GET", "/running"): lambda r: answer(models=rows, system=system(10**12, 0)),
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
