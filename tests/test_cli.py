"""`model sync`, `model start`, `model stop`, `model status` as a user runs them."""

import json
import subprocess
import time

import psutil

from shared.llama_server import find_llama_server
from shared.settings import load
from shared.tiny_gguf import write_model
from tests.harness import free_port, http
from tests.streams import chat

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"


def states(stack) -> dict[str, str]:
    return {m["id"]: m["status"] for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def test_sync_reloads_only_on_change_and_keeps_untouched_models_loaded(
        stack_factory, models_dir, config_dir) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    assert http("POST", stack.url + "/v1/chat/completions", chat(OTHER))[0] == 200
    result = stack.cli("sync")
    assert result.returncode == 0 and "2 models; engine config unchanged" in result.stdout

    write_model(models_dir / "pub" / "new" / "new-F32.gguf", name="new", seed=5)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  other:0.2m-f32:\n    sampler_args: --temp 0.2\n")
    result = stack.cli("sync")
    assert result.returncode == 0 and "3 models; engine config updated and reloaded" \
        in result.stdout, result.stderr
    status, body = http("POST", stack.url + "/v1/chat/completions", chat("ms/new:0.2m-f32"))
    assert status == 200, body
    now = states(stack)
    assert now[TINY] == "loaded"  # untouched: still loaded
    assert now[OTHER] == "unloaded"  # its settings changed: reloads on next use
    body = http("POST", stack.url + "/v1/chat/completions", chat(OTHER, verbose=True))[1]
    assert abs(body["__verbose"]["generation_settings"]["temperature"] - 0.2) < 1e-6


def test_sync_with_a_bad_config_says_why_and_keeps_serving(stack_factory, config_dir) -> None:
    stack = stack_factory().start()
    path = config_dir / "custom_models.yaml"
    path.write_text("models:\n  tiny:0.2m-f32:\n    ctx_size: big\n")
    result = stack.cli("sync")
    assert result.returncode == 1
    assert f"{path}: models.tiny:0.2m-f32.ctx_size: expected a whole number" in result.stderr
    assert "last good catalog" in result.stderr
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200


def test_start_status_stop_touch_only_their_own_processes(stack_factory) -> None:
    stack = stack_factory()
    settings = load(stack.env)
    stranger = subprocess.Popen([find_llama_server(settings), "--port", str(free_port())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = stack.cli("start")
        assert result.returncode == 0 and "is up on" in result.stdout, result.stderr
        assert stack.cli("start").stdout.startswith("already running")
        assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
        status = stack.cli("status")
        assert status.returncode == 0 and f"loaded: {TINY}" in status.stdout
        started = psutil.Process(json.loads((stack.state_dir / "stack.pid").read_text())["pid"])
        ours = [started, *started.children(recursive=True)]
        assert any("llama-server" in " ".join(p.cmdline()) for p in ours)

        result = stack.cli("stop")
        assert result.returncode == 0 and "stopped" in result.stdout
        time.sleep(0.5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ours)
        assert stranger.poll() is None  # a llama-server we did not start lives on
        assert stack.cli("status").returncode == 1
        assert stack.cli("stop").stdout.strip() == "not running"
    finally:
        stranger.terminate()
        stranger.wait()
