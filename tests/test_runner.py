"""The stack under the runner `make up` uses (`model start`: supervisord), as a user runs it:
each process killed outright while requests flow, restarts alone, the others serving."""

import http.client as http_client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer

import openai
import psutil
import pytest

from services.runner import client
from shared.llama_server import find_llama_server
from shared.settings import ROOT, load
from shared.tiny_gguf import write_model
from tests.harness import answers, free_port, http, wait
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"


@pytest.fixture
def runner(stack_factory):
    """A stack's environment for the `model` command; whatever it starts is stopped after."""
    stacks = []

    def make(**env: str):
        stack = stack_factory(**env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.cli("stop")


def pids(stack) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in client.processes(load(stack.env)) or []
            if p["statename"] == "RUNNING"}



class Traffic(threading.Thread):
    """Requests one after another; what each got back."""

    def __init__(self, stack, model: str = TINY) -> None:
        super().__init__(daemon=True)
        self.stack, self.model = stack, model
        self.results: list[tuple[float, object]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status, body = http("POST", self.stack.url + "/v1/chat/completions",
                                    chat(self.model), timeout=30)
                got = status if status == 200 else (status, body["error"]["code"])
            except (OSError, http_client.HTTPException) as e:  # e.g. cut off mid-answer
                got = e.__class__.__name__
            self.results.append((time.monotonic(), got))
            time.sleep(0.05)

    def since(self, moment: float) -> Counter:
        return Counter(str(r) for t, r in self.results if t >= moment)


def test_each_process_killed_restarts_alone_while_the_others_serve(runner) -> None:
    stack = runner()
    key = stack.state_dir / "engine.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("the previous start's key")
    result = stack.cli("start")
    assert result.returncode == 0 and "is up on" in result.stdout, result.stderr
    # a new engine key at each start, readable by this user alone
    assert key.read_text() != "the previous start's key" and key.stat().st_mode & 0o077 == 0
    traffic = Traffic(stack)
    traffic.start()
    try:
        for name in ("governor", "sync", "engine", "proxy"):
            time.sleep(1)
            before = pids(stack)
            killed = time.monotonic()
            os.kill(before[name], signal.SIGKILL)
            wait(lambda n=name, b=before: pids(stack).get(n) not in (None, b[n]))
            after = pids(stack)
            # only the killed one restarted
            assert {k: v for k, v in after.items() if k != name} == \
                {k: v for k, v in before.items() if k != name}
            wait(lambda: traffic.since(time.monotonic() - 0.5).get("200", 0) > 0, 30)
            seen = traffic.since(killed)
            if name in ("governor", "sync"):
                assert set(seen) == {"200"}, seen  # serving never noticed
            elif name == "engine":  # clients hear the engine is down, as JSON, until it is up
                # (the one answer cut off by the kill, if any, is an error too)
                cut = "(502, 'engine_error')"
                assert set(seen) <= {"200", "(503, 'engine_unavailable')", cut}, seen
                assert seen.get(cut, 0) <= 1
            else:  # the proxy itself: connections fail only while it restarts, never an error
                assert all(r == "200" or not r.startswith("(") for r in seen), seen
    finally:
        traffic.done.set()
        traffic.join(30)
    status = stack.cli("status")
    assert status.returncode == 0, status.stdout
    assert f"ollama: {stack.env['OLLAMA_BASE']}: not reachable" in status.stdout
    for name in ("governor", "sync", "engine", "proxy"):
        assert any(line.strip().startswith(name) and "crashed 1 time(s)" in line
                   for line in status.stdout.splitlines()), status.stdout
    everything = [psutil.Process(p) for p in pids(stack).values()]
    assert stack.cli("stop").stdout.strip() == "stopped"
    time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything)


def test_a_proxy_restart_finishes_the_open_stream(runner, models_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    stack = runner(DRAIN_SECONDS="300")  # room for a busy machine: the answer decides
    assert stack.cli("start").returncode == 0
    events: list[str] = []

    def stream() -> None:
        import urllib.request
        body = chat("ms/slow:33.8m-f32", max_tokens=300, stream=True, ignore_eos=True)
        req = urllib.request.Request(stack.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            events.extend(line.decode().strip() for line in r if line.strip())

    reader = threading.Thread(target=stream)
    reader.start()
    wait(lambda: len(events) > 3 or not reader.is_alive(), 60)
    restart = stack.cli("restart", "proxy")
    reader.join(60)
    assert restart.returncode == 0 and "restarted proxy" in restart.stdout, restart.stderr
    assert events[-1] == "data: [DONE]" and len(events) > 100  # the whole answer arrived
    assert http("GET", stack.url + "/health")[0] == 200


def test_a_stream_longer_than_the_drain_ends_with_an_error(runner, models_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    stack = runner(DRAIN_SECONDS="2")
    assert stack.cli("start").returncode == 0
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="ms/slow:33.8m-f32", messages=[{"role": "user", "content": "hi"}],
        max_tokens=100000, stream=True, extra_body={"ignore_eos": True})
    restart = None
    with pytest.raises(openai.APIError, match="proxy stopped before the answer was complete"):
        for n, _ in enumerate(stream):
            if n == 3:
                restart = threading.Thread(target=stack.cli, args=("restart", "proxy"))
                restart.start()
    restart.join(60)
    wait(lambda: answers(stack.url + "/health"), 30)



def test_start_fails_on_a_taken_port_naming_who_holds_it(runner) -> None:
    stack = runner()
    holder = socket.socket()
    holder.bind(("127.0.0.1", int(stack.env["LLAMA_SWAP_PORT"])))
    holder.listen()
    try:
        result = stack.cli("start")
        assert result.returncode == 1
        port = stack.env["LLAMA_SWAP_PORT"]
        assert f"port {port} (LLAMA_SWAP_PORT) is taken by pid {os.getpid()}" in result.stderr
        assert stack.cli("status").returncode == 1
    finally:
        holder.close()


def test_another_stacks_health_is_never_taken_for_ours(runner) -> None:
    """Something else answers /health on our port (another stack): `status` says so."""
    stack = runner()

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"status": "ok", "instance": "someone-else",
                               "state_dir": "/elsewhere"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"])), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status = stack.cli("status")
        assert status.returncode == 1
        assert "answers for another model-serve stack (state dir /elsewhere)" in status.stdout
        assert "HARMONY_PROXY_PORT" in stack.cli("start").stderr  # and start will not run
    finally:
        server.shutdown()


def test_a_process_that_cannot_start_is_reported_with_its_log(runner) -> None:
    stack = runner(LLAMA_SERVER="/nonexistent/llama-server")
    result = stack.cli("start", "--wait", "90")
    assert result.returncode == 1
    assert "engine could not start" in result.stderr
    assert "/nonexistent/llama-server" in result.stderr  # the last lines of its log
    assert stack.cli("status").stdout.startswith("stack: stopped")


def test_logs_have_times_processes_and_a_file_per_model(runner) -> None:
    stack = runner()
    assert stack.cli("start").returncode == 0
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
    assert status == 200, (body, stack.cli("logs", "-n", "60").stdout)
    wait(lambda: "loaded ms/tiny" in stack.cli("logs", "proxy").stdout, 10)
    merged = stack.cli("logs", "-n", "200").stdout.splitlines()
    assert merged and all(line[:4].isdigit() and line[4] == "-" for line in merged[:5])
    assert {w.split(":")[0] for line in merged for w in line.split()[2:3]} >= {
        "engine", "proxy", "governor", "sync"}
    assert merged == sorted(merged, key=lambda x: x[:23])
    engine = stack.cli("logs", "engine", "-n", "200").stdout
    assert "starting ms_tiny_0.2m-f32 on port" in engine and "its log:" in engine
    assert "load:   --port" not in engine and "security:" not in engine
    model_log = stack.cli("logs", TINY).stdout
    assert "load_model: loading model" in model_log
    assert stack.cli("logs", "nosuch").returncode == 2


def test_the_suite_runs_beside_a_users_own_stack(stack_factory) -> None:
    """A user's stack holds the default ports; the tests' stacks never touch them."""
    held = []
    for port in (5846, 5847, 5848):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        except OSError:
            s.close()  # already taken on this machine: as good
    try:
        stack = stack_factory().start("engine", "proxy", "governor")
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
        assert status == 200, body
        governor = f"http://127.0.0.1:{stack.env['GOVERNOR_PORT']}/health"
        assert stack.env["GOVERNOR_PORT"] != "5848" and http("GET", governor)[0] == 200
    finally:
        for s in held:
            s.close()


def test_a_llama_server_we_did_not_start_lives_on(runner) -> None:
    stack = runner()
    stranger = subprocess.Popen([find_llama_server(load(stack.env)), "--port",
                                 str(free_port())], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        assert stack.cli("start").returncode == 0
        assert stack.cli("start").stdout.startswith("already running")
        assert stack.cli("stop").stdout.strip() == "stopped"
        assert stranger.poll() is None
        assert stack.cli("stop").stdout.strip() == "not running"
    finally:
        stranger.terminate()
        stranger.wait()


def test_start_says_how_to_reach_model_and_restart_brings_every_process_back(runner) -> None:
    stack = runner()
    result = stack.cli("start")  # the last step of `make up`
    assert result.returncode == 0, result.stderr
    bindir = os.path.dirname(sys.executable)
    assert f"the model command: {bindir}/model" in result.stdout
    assert "(from the checkout: .venv/bin/model)" in result.stdout or \
        not bindir.startswith(str(ROOT))
    assert f'export PATH="{bindir}:$PATH"' in result.stdout
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    before = pids(stack)
    assert set(before) == {"engine", "proxy", "governor", "sync"}

    again = stack.cli("restart")  # all of them: the proxy first, then the engine
    assert again.returncode == 0, again.stderr
    for name in before:
        assert f"restarted {name}" in again.stdout
    after = pids(stack)
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    status = stack.cli("status")
    assert status.returncode == 0, status.stdout

    one = stack.cli("restart", "engine")
    assert one.returncode == 0 and "restarted engine" in one.stdout, one.stderr
    now = pids(stack)
    assert now["engine"] != after["engine"] and now["proxy"] == after["proxy"]
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
