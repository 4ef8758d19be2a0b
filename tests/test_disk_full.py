"""A full STATE_DIR, as a user meets it, under the runner `make up` uses (`model start`: real
supervisord, real llama-server): STATE_DIR on a small tmpfs, filled up while a warm model
answers, then freed. And a process supervisord gave up on, tried again once its cause passes.
Mounting needs root on Linux (CI runs so); elsewhere these tests skip, saying why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.cli.stack import recorded
from services.runner import client
from services.runner.listener import RETRY_FATAL
from shared.llama_server import find_llama_server
from shared.settings import INSTANCE_ENV, load
from tests.harness import http, wait
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"


def mount_tmpfs(path: Path, size: str) -> None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a small tmpfs as a full disk")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def full_disk_stack(stack_factory, tmp_path):
    """A stack whose STATE_DIR is a 16 MiB tmpfs; stopped, then unmounted, after the test."""
    state = tmp_path / "state"
    mount_tmpfs(state, "16m")
    stack = stack_factory()
    try:
        yield stack
    finally:
        stack.cli("stop")
        if subprocess.run(["umount", str(state)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)


def pids(stack) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in client.processes(load(stack.env)) or []
            if p["statename"] == "RUNNING"}


def states(stack) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in client.processes(load(stack.env)) or []}


def everything(stack) -> list[psutil.Process]:
    """The processes supervisord runs and all their children (llama-server's)."""
    procs = [psutil.Process(pid) for pid in pids(stack).values()]
    return procs + [c for p in procs for c in p.children(recursive=True)]


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def test_a_full_state_dir_degrades_heals_and_stops_cleanly(full_disk_stack) -> None:
    stack = full_disk_stack
    started = stack.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200  # warm
    before = pids(stack)
    filler = fill(stack.state_dir)

    # every answer of the warm model is written to its log: each line now fails
    answers = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        answers.append(http("POST", stack.url + "/v1/chat/completions",
                            chat(TINY, max_tokens=32), timeout=30)[0])
    assert set(answers) == {200}, answers
    status, health = http("GET", stack.url + "/health")
    assert status == 200 and health["status"] == "degraded", health
    assert any(f"STATE_DIR {stack.state_dir} is on a full filesystem" in w
               for w in health["warnings"]), health
    doctor = stack.cli("doctor")
    assert doctor.returncode == 1
    assert f"FAIL  STATE_DIR {stack.state_dir} is on a full filesystem" in doctor.stdout
    assert "the most room is taken by: filler " in doctor.stdout, doctor.stdout
    status = stack.cli("status")
    assert status.returncode == 1 and "stack: running" in status.stdout
    assert "warning: STATE_DIR" in status.stdout, status.stdout

    filler.unlink()
    wait(lambda: stack.cli("status").returncode == 0, 30)  # well again, by itself
    status, health = http("GET", stack.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["warnings"] == []
    assert pids(stack) == before  # no process died or was restarted on the way
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    assert "line(s) lost here: the disk was full" in stack.cli("logs", TINY).stdout

    # supervisord gone (killed): what it ran serves on, and is still the stack's to stop
    stranger = subprocess.Popen(["sleep", "120"], env={**os.environ, INSTANCE_ENV: "another"})
    ours = everything(stack)
    supervisord = psutil.Process(recorded(load(stack.env))["pid"])
    supervisord.kill()
    supervisord.wait(10)
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    status = stack.cli("status")
    assert status.returncode == 1
    assert "stack: crashed (its supervisord is gone); still running without it:" in \
        status.stdout and f"proxy (pid {before['proxy']})" in status.stdout, status.stdout
    assert "its supervisord is gone" in stack.cli("restart", "engine").stderr
    stopped = stack.cli("stop")
    assert stopped.stdout.startswith("stopped what was left of the stack"), stopped.stdout
    assert f"proxy (pid {before['proxy']})" in stopped.stdout
    assert not [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert stranger.poll() is None  # another stack's process is not this one's to stop
    stranger.kill()
    stranger.wait()
    assert stack.cli("status").stdout.startswith("stack: stopped")


def test_a_process_that_gave_up_starting_is_tried_again(stack_factory, tmp_path) -> None:
    """The engine fails at every start for a while (here: its llama-server cannot run), so
    supervisord gives up on it; once the cause is gone it comes back by itself."""
    stack = stack_factory()
    broken = tmp_path / "broken"
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f"#!/bin/sh\n[ -e {broken} ] && {{ echo 'cannot run' >&2; exit 1; }}\n"
                       f"exec {find_llama_server(load(stack.env))} \"$@\"\n")
    wrapper.chmod(0o755)
    stack.env["LLAMA_SERVER"] = str(wrapper)
    try:
        assert stack.cli("start").returncode == 0
        broken.touch()
        os.kill(pids(stack)["engine"], signal.SIGKILL)
        wait(lambda: states(stack).get("engine") == "FATAL", 60)
        assert f"it kept failing at start (tried again every {RETRY_FATAL} s)" in \
            stack.cli("status").stdout
        broken.unlink()
        wait(lambda: states(stack).get("engine") == "RUNNING", RETRY_FATAL + 15)
        assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    finally:
        stack.cli("stop")
