"""llama.cpp's RPC for real: `model rpc-worker` processes (rpc-server) hold the weights of a
model whose custom_models.yaml entry names them in `rpc:`."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from shared.catalog import params_label
from shared.custom_models import load
from shared.gguf_header import read_header
from shared.llama_server import find_llama_server
from shared.memory import RPC_MEASURED
from shared.rpc import find_rpc_server, reachable
from shared.tiny_gguf import write_model
from tests.browser import Chromium
from tests.harness import ROOT, end, free_ports, http, wait
from tests.streams import chat

MIB = 1024**2
# `model` as the stack's tests run it (.venv/bin/model is the main checkout's)
MODEL = [sys.executable, "-m", "services.cli"]


def _binaries() -> str | None:
    """Why the RPC tests cannot run here, or None."""
    given = SimpleNamespace(llama_server=os.environ.get("LLAMA_SERVER", ""))
    try:
        find_rpc_server(given)
        server = find_llama_server(given)
    except FileNotFoundError as e:
        return str(e)
    out = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=60)
    return None if "--rpc" in out.stdout else f"{server} was built without RPC (no --rpc)"


SKIP = _binaries()
needs_rpc = pytest.mark.skipif(SKIP is not None, reason=f"no RPC binaries: {SKIP}")


class Worker:
    """`model rpc-worker` as a user runs it: the process becomes rpc-server itself."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([*MODEL, "rpc-worker", *args], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stderr_until(self, text: str, timeout: float = 30) -> str:
        """What it wrote to stderr up to and including `text`."""
        seen = b""
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                assert chunk, "rpc-worker ended: " + seen.decode(errors="replace")
                seen += chunk
        return seen.decode(errors="replace")

    def stop(self) -> None:
        end(self.proc)


@pytest.fixture
def workers():
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str) -> Worker:
        worker = Worker(env, *args)
        started.append(worker)
        return worker
    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """About 300 MB of f32 weights: enough for the workers' growth to show."""
    root = tmp_path_factory.mktemp("rpc-models")
    return write_model(root / "pub" / "spread-GGUF" / "spread-F32.gguf", name="spread",
                       n_embd=1024, n_layer=4)


def model_id(path: Path) -> str:
    return f"ms/spread:{params_label(read_header(path).param_count)}-f32"


@needs_rpc
def test_a_model_over_two_local_workers_answers_and_they_hold_its_weights(
        stack_factory, config_dir, big_model, workers) -> None:
    p1, p2 = free_ports(2)
    mid = model_id(big_model)
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {mid.removeprefix('ms/')}:\n    rpc: [127.0.0.1:{p1}, 127.0.0.1:{p2}]\n")
    stack = stack_factory(MODELS_DIR=str(big_model.parents[2]), DEFAULT_CTX_SIZE="512")
    started = [workers(stack.env, "--port", str(p)) for p in (p1, p2)]
    for p in (p1, p2):
        wait(lambda p=p: reachable(f"127.0.0.1:{p}"), 30)
    before = sum(w.rss() for w in started)
    stack.start("engine", "proxy")

    status, body = http("POST", stack.url + "/v1/chat/completions", chat(mid, max_tokens=4),
                        timeout=300)
    assert status == 200, (body, stack.logs())
    size = big_model.stat().st_size
    grown = sum(w.rss() for w in started) - before
    assert grown >= size / 2, f"the workers grew by {grown / MIB:.0f} MiB of {size / MIB:.0f}"

    running = http("GET", stack.url + "/running")[1]
    rows = {w["address"]: w for w in running["rpc_workers"]}
    for p in (p1, p2):
        row = rows[f"127.0.0.1:{p}"]
        assert row["up"] and row["models"] == row["in_use_by"] == [mid]
        assert row["on_this_machine"]
        assert row["memory"] and row["memory"] > 0
    [model] = [m for m in running["models"] if m["id"] == mid]
    # before its first load the whole model was counted, and the row says what it counts
    assert model["memory_note"].startswith("rpc:")
    assert model["memory"]["measured"]
    # once its load is measured, the part here counts: far less than the file
    def learned() -> dict:
        rows = http("GET", stack.url + "/running")[1]["models"]
        return next(m for m in rows if m["id"] == mid)
    wait(lambda: learned()["memory_note"] == RPC_MEASURED, 60)
    model = learned()
    assert model["memory"]["measured"] < size / 2, model
    assert model["memory"]["estimated"] < size, model
    metrics = http("GET", stack.url + "/metrics")[1]
    assert f"model_serve_rpc_worker_up{{worker=\"127.0.0.1:{p1}\"}} 1" in metrics, [
        line for line in metrics.splitlines() if "rpc_worker" in line]
    assert "uses the RPC workers" in stack.logs()
    asyncio.run(_dashboard_shows(stack.url, f"127.0.0.1:{p1}", mid))
    for _ in range(2):  # the workers the model holds are not probed (a probe would queue)
        doctor = stack.cli("doctor").stdout
        assert "does not answer" not in doctor and "RPC workers: 2, on loopback, up" in doctor


async def _dashboard_shows(url: str, worker: str, mid: str) -> None:
    async with Chromium() as browser:
        page = await browser.open(url + "/")
        row = f"document.querySelector('#worker-table tr[data-worker=\"{worker}\"]')"
        assert await page.until(f"{row}?.dataset.up") == "true"
        assert await page.js(f"{row}.children[2].textContent") == mid
        assert (await page.js(f"{row}.children[3].textContent")).endswith("MiB")


def test_a_bad_rpc_entry_is_a_config_error_naming_file_key_and_reason(tmp_path) -> None:
    file = tmp_path / "custom_models.yaml"
    file.write_text("models:\n  a:\n    rpc: [127.0.0.1:50052, nohost, '10.0.0.2:99999']\n"
                    "  b:\n    rpc: 127.0.0.1:50052\n  c:\n    rpc: ['[::1]:50052']\n")
    models, notices = load(file)
    assert [m.name for m in models] == ["c"]
    assert any(f"{file}: models.a.rpc[1]: 'nohost': expected host:port" in n
               and n.endswith("entry ignored") for n in notices), notices
    assert any("models.a.rpc[2]" in n and "port must be a number from 1 to 65535" in n
               for n in notices), notices
    assert any(f"{file}: models.b.rpc: expected a list" in n for n in notices), notices


@needs_rpc
def test_a_worker_listening_wider_than_loopback_is_warned_about(
        stack_factory, config_dir, models_dir, workers) -> None:
    tiny = models_dir / "pub" / "tiny-GGUF" / "tiny-F32.gguf"
    name = f"tiny:{params_label(read_header(tiny).param_count)}-f32"
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {name}:\n    rpc: ['192.0.2.7:50052']\n")  # TEST-NET-1: never answers
    stack = stack_factory()
    [port] = free_ports(1)
    worker = workers(stack.env, "--host", "0.0.0.0", "--port", str(port))
    said = worker.stderr_until("rpc-worker: ")
    assert "WARNING: rpc-worker listens on 0.0.0.0" in said
    assert "no authentication" in said
    wait(lambda: reachable(f"127.0.0.1:{port}"), 30)

    out = stack.cli("doctor")
    text = out.stdout
    assert f"RPC worker 192.0.2.7:50052 (used by ms/{name})" in text, text
    assert "is reached over the network: llama.cpp's RPC has no authentication" in text
    assert f"this machine's rpc-worker listens on 0.0.0.0:{port}" in text, text


@needs_rpc
def test_a_worker_capped_by_mem_refuses_a_model_bigger_than_the_cap(
        stack_factory, config_dir, big_model, workers) -> None:
    [port] = free_ports(1)
    mid = model_id(big_model)
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {mid.removeprefix('ms/')}:\n    rpc: [127.0.0.1:{port}]\n")
    stack = stack_factory(MODELS_DIR=str(big_model.parents[2]), DEFAULT_CTX_SIZE="512")
    worker = workers(stack.env, "--port", str(port), "--mem", "64")
    said = worker.stderr_until("rpc-worker: /")
    if sys.platform.startswith("linux"):
        assert "capped at" in said and "RLIMIT_DATA" in said
    else:
        assert "NOT enforced" in said
        pytest.skip("--mem is enforced on Linux only")
    wait(lambda: reachable(f"127.0.0.1:{port}"), 30)
    stack.start("engine", "proxy")
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(mid, max_tokens=4),
                        timeout=300)
    assert status >= 500, body
    assert worker.proc.poll() is None  # the worker refused the buffer and lives on
    # the model's own log names the worker that could not take its part
    [log] = (stack.state_dir / "logs" / "models").glob("*spread*.log")
    assert f"unable to allocate RPC0[127.0.0.1:{port}] buffer" in log.read_text(), body
    # and the client is told so, not only pointed at a log
    assert "its log says: " in body["error"]["message"], body
    assert f"RPC0[127.0.0.1:{port}]" in body["error"]["message"], body


@needs_rpc
def test_a_worker_that_does_not_answer_is_named_to_the_client(stack_factory, config_dir,
                                                               big_model) -> None:
    [port] = free_ports(1)  # nobody listens there
    mid = model_id(big_model)
    (config_dir / "custom_models.yaml").write_text(
        f"models:\n  {mid.removeprefix('ms/')}:\n    rpc: [127.0.0.1:{port}]\n")
    stack = stack_factory(MODELS_DIR=str(big_model.parents[2]), DEFAULT_CTX_SIZE="512")
    stack.start("engine", "proxy")
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(mid, max_tokens=4),
                        timeout=300)
    assert status >= 500, body
    assert f"127.0.0.1:{port}" in body["error"]["message"], body
    worker = next(w for w in http("GET", stack.url + "/running")[1]["rpc_workers"])
    assert worker["address"] == f"127.0.0.1:{port}" and worker["up"] is False


def test_both_engines_start_the_model_with_its_workers(tmp_path) -> None:
    from shared.catalog import Catalog, Entry
    from shared.engines.llama_swap import LlamaSwap
    from shared.engines.router import Router
    from shared.settings import load as load_settings

    settings = load_settings({"STATE_DIR": str(tmp_path / "state")}, env_file=tmp_path / "no")
    entry = Entry(id="ms/a:1m-f32", path=str(tmp_path / "a.gguf"),
                  rpc=["127.0.0.1:50052", "[::1]:50053"])
    catalog = Catalog(entries={entry.id: entry})
    assert "rpc = 127.0.0.1:50052,[::1]:50053" in Router(settings).render(catalog)
    assert "--rpc '127.0.0.1:50052,[::1]:50053'" in LlamaSwap(settings).render(catalog)
