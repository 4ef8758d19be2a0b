"""`model top` on a real stack: one frame (--once, as a script or a pipe gets it), and the live
view in a pseudo-terminal, quit with q."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from http.client import HTTPConnection

import pytest

from shared.settings import ROOT
from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"


def running(stack) -> dict:
    return http("GET", stack.url + "/running")[1]


def row(out: str, model: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(model + " "))


def test_once_shows_the_memory_and_each_loaded_model(stack_factory) -> None:
    stack = stack_factory().start("engine", "proxy", "governor")
    wait(lambda: running(stack)["system"]["governor"] == "up", 60)

    empty = stack.cli("top", "--once")
    assert empty.returncode == 0, empty.stderr
    assert "no models loaded" in empty.stdout
    assert " budget [" in empty.stdout and "threshold 75%" in empty.stdout
    assert "governor up; pressure: " in empty.stdout
    assert "(q quits)" not in empty.stdout and "\x1b[" not in empty.stdout  # plain text

    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    loaded = stack.cli("top", "--once")
    assert loaded.returncode == 0, loaded.stderr
    assert "no models loaded" not in loaded.stdout
    header = next(line for line in loaded.stdout.splitlines() if line.startswith("MODEL"))
    for column in ("BACKEND", "STATE", "MEMORY", "ACTIVE", "QUEUED", "IDLE", "TTL LEFT",
                   "PINNED"):
        assert column in header
    model, backend, state, size, unit, membar, active, queued = row(loaded.stdout, TINY)[:8]
    assert (backend, state, unit, active, queued) == ("engine", "loaded", "MiB", "0", "0")
    assert membar.startswith("[") and membar.endswith("]")
    # the figure /running gives, measured or (marked ~) estimated
    mem = next(m for m in running(stack)["models"] if m["id"] == TINY)["memory"]
    assert size.lstrip("~").replace(",", "").isdigit()
    assert size.startswith("~") == (mem["measured"] is None)
    events = loaded.stdout.split("\nEVENTS\n")[1].splitlines()
    assert f"{TINY} (engine) loaded in " in events[0] and f"{TINY} (engine) loading" in events[1]


def test_once_shows_requests_in_flight_and_queued(stack_factory, models_dir,
                                                  config_dir) -> None:
    slow = "ms/slow:33.8m-f32"
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  slow:33.8m-f32:\n    max_concurrent: 1\n")
    stack = stack_factory().start()
    assert http("POST", stack.url + "/models/load", {"model": slow})[0] == 200
    first = HTTPConnection("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"]), timeout=60)
    first.request("POST", "/v1/chat/completions", json.dumps(  # streams until closed
        chat(slow, max_tokens=100000, ignore_eos=True, stream=True)),
        {"Content-Type": "application/json"})
    assert first.getresponse().status == 200
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(
        http("POST", stack.url + "/v1/chat/completions", chat(slow))))
    waiter.start()
    try:
        wait(lambda: next(m for m in running(stack)["models"]
                          if m["id"] == slow)["queue"]["queued"] == 1, 30)
        result = stack.cli("top", "--once")
        assert result.returncode == 0, result.stderr
        cells = row(result.stdout, slow)
        active, queued, longest = cells[6:9]
        assert (active, queued, longest) == ("1", "1", "(longest")
        assert cells[10:12] == ["in", "use"]  # not idle, and not counting up as if it were
        # /running agrees: a model in use is not idle, its TTL runs from its last request's end
        asked = time.time()
        busy = next(m for m in running(stack)["models"] if m["id"] == slow)
        assert busy["idle_seconds"] == 0 and busy["expires_at"] >= asked + busy["ttl"]
    finally:
        first.close()  # the stream ends: the queued request gets the slot
        waiter.join(60)
    assert second and second[0][0] == 200


def test_once_sends_the_api_key(stack_factory) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    assert http("GET", stack.url + "/running")[0] == 401  # so top had to send it
    result = stack.cli("top", "--once")
    assert result.returncode == 0, result.stdout
    assert "no models loaded" in result.stdout


def test_once_says_the_proxy_is_down_and_exits_non_zero(stack_factory) -> None:
    stack = stack_factory()  # not started
    result = stack.cli("top", "--once")
    assert result.returncode == 1
    assert f"proxy: the proxy at {stack.url} is not answering" in result.stdout
    assert "Traceback" not in result.stderr


def controlling_terminal() -> None:
    """In the child, after its setsid: the pty becomes its terminal, so Ctrl-C is SIGINT."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_live_view_in_a_terminal_follows_the_stack_and_quits(stack_factory, key) -> None:
    stack = stack_factory().start()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 150, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "top", "--interval", "0.2"],
                            cwd=ROOT, env=stack.env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    seen = b""

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60  # a hang guard only
        while text not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # EIO: top has exited and closed the terminal
                    break

    try:
        read_until(b"no models loaded")
        assert b"(q quits)" in seen and b"\x1b[?1049h" in seen  # drawn on the alternate screen
        assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
        read_until(TINY.encode() + b"  engine   loaded")
        assert http("POST", stack.url + "/models/unload", {"model": TINY})[0] == 200
        read_until(TINY.encode() + b"  engine   unloaded")  # top remembers what it saw
        read_until(TINY.encode() + b" (engine) unloaded: manual")  # and the event says why
        stack.stop()
        read_until(b"is not answering")  # said in the frame, and top goes on
        assert proc.poll() is None
        os.write(master, key)
        assert proc.wait(60) == 0
        read_until(b"\x1b[?1049l")
        assert b"\x1b[?1049l" in seen and b"Traceback" not in seen  # the terminal given back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
