"""The sync service outlasts an engine that misses a reload: the real router, reached by the
sync through a gate the test opens and shuts, takes up a config the sync wrote while it could
not be reached, once it can be, with no further change; and no fault ends the sync's loop."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from shared.engines.base import section_name
from shared.tiny_gguf import write_model
from tests.harness import Stack, free_port, http, wait
from tests.streams import chat

NEW = "ms/new:0.2m-f32"
# a reply the engine's client cannot read: JSON by its header, not by its body
NONSENSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n"
            b"Connection: close\r\n\r\nnot json!")


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


class Gate:
    """A port in front of the engine. Shut, nothing listens there (a connection is refused);
    `nonsense` answers every request with NONSENSE; `open` passes each connection on."""

    def __init__(self, target: int) -> None:
        self.port, self.target = free_port(), target
        self.mode = "shut"
        self.nonsense = 0  # requests answered so
        self.server: socket.socket | None = None

    def set(self, mode: str) -> None:
        self.mode = mode
        if self.server is None:
            self.server = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        if self.server:
            self.server.close()

    def _accept(self) -> None:
        assert self.server
        with contextlib.suppress(OSError):  # closed at the test's end
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if self.mode == "nonsense":
                conn.recv(65536)
                conn.sendall(NONSENSE)
                self.nonsense += 1
                return
            with socket.create_connection(("127.0.0.1", self.target)) as engine:
                threading.Thread(target=_pipe, args=(conn, engine), daemon=True).start()
                _pipe(engine, conn)


@pytest.fixture
def gated(stack_factory):
    """(the stack on the real router, the gate, the stack as the sync sees it: its engine
    behind the gate). The sync service itself is started by the test."""
    stack = stack_factory().start()
    gate = Gate(int(stack.env["LLAMA_SWAP_PORT"]))
    behind = replace(stack, env={**stack.env, "LLAMA_SWAP_PORT": str(gate.port)}, procs=[])
    yield stack, gate, behind
    stack.procs += behind.procs  # stopped with the stack
    gate.close()


def start_sync(behind: Stack) -> None:
    behind.start("sync", wait=False)
    wait(lambda: "synced in" in sync_log(behind), 60)


def sync_log(stack: Stack) -> str:
    path = stack.root / "sync.log"
    return path.read_text() if path.exists() else ""


def router_lists(stack: Stack, model_id: str) -> bool:
    status, body = http("GET", stack.engine_url + "/models", headers=stack.engine_headers)
    assert status == 200, body
    return section_name(model_id) in {m["id"] for m in body["data"]}


def add_model(models_dir: Path, stack: Stack) -> None:
    """A new model file; returns once the sync has written it into the engine's config."""
    write_model(models_dir / "pub" / "new" / "new-F32.gguf", name="new", seed=5)
    wait(lambda: NEW in (stack.state_dir / "presets.ini").read_text(), 60)


def test_a_reload_the_router_missed_is_made_once_it_answers(gated, models_dir) -> None:
    stack, gate, behind = gated
    start_sync(behind)
    add_model(models_dir, stack)
    wait(lambda: "3 models" in sync_log(behind), 60)  # the sync is done, its reload refused
    assert not router_lists(stack, NEW)

    gate.set("open")  # and nothing else changes
    wait(lambda: router_lists(stack, NEW), 60)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(NEW))
    assert status == 200, body
    log = sync_log(behind)
    assert log.count("is not running to take up its new config") == 1, log
    assert log.count("recovered from an engine not running") == 1, log
    assert not (stack.state_dir / "engine-reload-due").exists()


def test_no_fault_ends_the_sync_and_model_sync_says_the_reload_failed(
        gated, models_dir) -> None:
    stack, gate, behind = gated
    gate.set("nonsense")
    start_sync(behind)
    [sync] = behind.procs
    add_model(models_dir, stack)
    wait(lambda: gate.nonsense >= 1, 60)  # the sync's reload, answered with nonsense

    result = behind.cli("sync")  # as the user would, while the engine answers nonsense
    assert sync.poll() is None, sync_log(behind)  # the service goes on, trying again
    assert result.returncode == 1, result.stdout + result.stderr
    assert "engine config unchanged, but the engine did not take it up: its reload failed: " \
        "llama-server router at " in result.stderr
    assert "Traceback" not in result.stderr
    assert not router_lists(stack, NEW)
    wait(lambda: gate.nonsense >= 3, 60)  # the sync, `model sync` and a try of the sync's own

    gate.set("open")
    wait(lambda: router_lists(stack, NEW), 60)
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(NEW))
    assert status == 200, body
    log = sync_log(behind)
    assert log.count("did not take it up") == 1 and "Traceback" not in log, log
    assert log.count("recovered from a failed engine reload") == 1, log
