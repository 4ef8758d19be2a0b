"""`model sync`, `doctor`, `show` and `run` as a user runs them (start, stop, status and
the runner are in test_runner.py)."""

import re
import signal
import socket
import subprocess
import sys

from shared.settings import ROOT
from shared.tiny_gguf import write_model
from tests.harness import http
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
    assert result.returncode == 0, result.stderr
    assert f"note: {path}: models.tiny:0.2m-f32.ctx_size: expected a whole number, got 'big'; " \
        "entry ignored" in result.stderr
    assert "2 models" in result.stdout
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200


def test_sync_says_each_problem_once(stack_factory, config_dir) -> None:
    stack = stack_factory()
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    ttl: soon\n  gone:1b:\n    ttl: 5\n")
    result = stack.cli("sync")
    assert result.returncode == 0
    assert (result.stdout + result.stderr).count("models.tiny:0.2m-f32.ttl") == 1
    assert (result.stdout + result.stderr).count("models.gone:1b: no model file") == 1


def test_doctor_passes_a_good_setup_and_names_the_setting_to_fix(stack_factory, config_dir,
                                                                  models_dir) -> None:
    stack = stack_factory()
    good = stack.cli("doctor")
    assert good.returncode == 0, good.stdout
    assert "OK    llama-server:" in good.stdout and "(router mode)" in good.stdout
    # optional, and no served model needs it: a note, not a warning
    assert "NOTE  Ollama is not reachable" in good.stdout, good.stdout
    assert "WARN  Ollama" not in good.stdout
    assert "OK    Harmony vocabulary" in good.stdout and "limit 75%" in good.stdout

    old = stack_factory(LLAMA_SERVER="/bin/true").cli("doctor")
    assert old.returncode == 1 and "too old for router mode" in old.stdout
    assert "LLAMA_SERVER" in old.stdout

    holder = socket.socket()
    holder.bind(("127.0.0.1", int(stack.env["GOVERNOR_PORT"])))
    holder.listen()
    try:
        taken = stack.cli("doctor")
    finally:
        holder.close()
    assert taken.returncode == 1
    assert f"FAIL  port {stack.env['GOVERNOR_PORT']} (GOVERNOR_PORT) is taken by pid" in \
        taken.stdout and "set GOVERNOR_PORT in .env" in taken.stdout

    (config_dir / "custom_models.yaml").write_text("models:\n  tiny:0.2m-f32:\n    pin: 3\n")
    bad = stack.cli("doctor")  # a warning: everything else is served meanwhile
    assert bad.returncode == 0 and "WARN  " in bad.stdout
    assert "custom_models.yaml: models.tiny:0.2m-f32.pin" in bad.stdout
    warning = bad.stdout.split("custom_models.yaml: models.tiny:0.2m-f32.pin")[1]
    assert warning.splitlines()[1].strip().startswith(
        f"fix: correct it in {config_dir / 'custom_models.yaml'}"), bad.stdout
    assert "OK    config: 2 models served" in bad.stdout

    # a name the router's preset cannot hold is counted out, with the reason; a file whose
    # path it cannot hold is served through a link
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  we;ird:\n    base_model: tiny:0.2m-f32\n")
    write_model(models_dir / "pub" / "odd" / "we;ird-F32.gguf", name="weird", seed=3)
    odd = stack.cli("doctor")
    assert "ms/we;ird: not served by llama-server router" in odd.stdout
    assert "OK    config: 3 models served" in odd.stdout


def test_show_reads_like_prose_and_gives_the_engines_own_arguments(stack_factory) -> None:
    stack = stack_factory().start()
    shown = stack.cli("show", TINY)
    assert shown.returncode == 0, shown.stderr
    assert "None" not in shown.stdout and "False" not in shown.stdout and "[" not in \
        shown.stdout.split("runs it as")[0]
    assert "llama-server router runs it as" in shown.stdout
    assert "--alias ms_tiny_0.2m-f32 --ctx-size 4096" in shown.stdout
    # not loaded: no port that looks like an address to call
    assert "not loaded: no port yet" in shown.stdout and "--port" not in shown.stdout

    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    loaded = stack.cli("show", TINY).stdout
    port = re.search(r"loaded now: its own llama-server at http://127\.0\.0\.1:(\d+)",
                     loaded)
    assert port, loaded
    assert f"--port {port[1]}" in loaded  # its real address, as the engine reports it
    status, _ = http("GET", f"http://127.0.0.1:{port[1]}/health")
    assert status == 200


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(stack_factory, models_dir,
                                                     config_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  slow:33.8m-f32:\n    sampler_args: --ignore-eos --n-predict 100000\n")
    stack = stack_factory().start()
    chat_proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run",
                                  "ms/slow:33.8m-f32"], cwd=ROOT, env=stack.env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    chat_proc.stdin.write(b"tell me everything\n")
    chat_proc.stdin.flush()
    answer = chat_proc.stdout.read(40)  # the prompt, then the answer streaming
    assert len(answer) == 40
    chat_proc.send_signal(signal.SIGINT)
    out, err = chat_proc.communicate(b"/bye\n", timeout=60)
    assert chat_proc.returncode == 0, err
    assert b"[stopped]" in out and out.rstrip().endswith(b">>>")


def test_merged_logs_keep_a_traceback_with_its_line(stack_factory) -> None:
    stack = stack_factory()
    logs = stack.state_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "proxy.log").write_text(
        "2026-11-23 10:00:01.000 proxy: POST /v1/chat/completions failed\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
        "2026-11-23 10:00:05.000 proxy: later\n")
    (logs / "engine.log").write_text("2026-11-23 10:00:03.000 engine: loaded ms/x\n")
    lines = stack.cli("logs", "-n", "10").stdout.splitlines()
    assert lines == [
        "2026-11-23 10:00:01.000 proxy: POST /v1/chat/completions failed",
        "Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom",
        "2026-11-23 10:00:03.000 engine: loaded ms/x", "2026-11-23 10:00:05.000 proxy: later"]


def test_run_takes_every_spelling_the_proxy_takes(stack_factory, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  creative:\n    base_model: tiny:0.2m-f32\n")
    stack = stack_factory().start()
    for name in ("tiny:0.2m-f32", "tiny-0.2m-f32", "ms/tiny:0.2m-f32", "creative"):
        result = stack.cli("run", name, input="hi\n/bye\n")
        assert result.returncode == 0, (name, result.stderr)
    result = stack.cli("run", "nosuch", input="/bye\n")
    assert result.returncode == 1 and "no model named 'nosuch'" in result.stderr


def test_list_and_names_without_ollama_list_the_served_models(stack_factory) -> None:
    """Someone who only uses LM Studio: Ollama is not running, the models are served."""
    stack = stack_factory()
    assert stack.cli("sync").returncode == 0
    listed = stack.cli("list")
    assert listed.returncode == 0, listed.stderr
    assert TINY in listed.stdout and OTHER in listed.stdout and "CONTEXT" in listed.stdout
    assert "note: Ollama is not reachable at " + stack.env["OLLAMA_BASE"] in listed.stderr
    named = stack.cli("names")
    assert named.returncode == 0, named.stderr
    assert TINY in named.stdout and OTHER in named.stdout
    assert "note: Ollama is not reachable" in named.stderr
    assert stack.cli("names", "nosuch").returncode == 1  # a name that matches nothing


def test_model_without_a_command_prints_the_usage_and_fails(stack_factory) -> None:
    result = stack_factory().cli()
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "doctor" in result.stderr


def test_every_command_is_listed_and_one_loads_only_what_it_needs() -> None:
    """Commands are imported when run: the help lists each by its own name, and the
    everyday ones start without numpy, openai-harmony or supervisor (half a second)."""
    probe = """
import sys
from click.testing import CliRunner
from services.cli.main import COMMANDS, cli
out = CliRunner().invoke(cli, ["names", "--help"], prog_name="model").output
heavy = sorted(m for m in ("numpy", "openai_harmony", "supervisor") if m in sys.modules)
ctx = cli.make_context("model", ["--help"], resilient_parsing=True)
names = {n: cli.get_command(ctx, n).name for n in cli.list_commands(ctx)}
print(heavy, "Usage: model names" in out, all(k == v for k, v in names.items()), len(names))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.split() == ["[]", "True", "True", "20"], result.stdout + result.stderr


def test_doctor_warns_of_ollama_only_for_the_embeddings_it_answers(stack_factory, models_dir,
                                                                   config_dir) -> None:
    write_model(models_dir / "pub" / "emb" / "emb-F32.gguf", name="emb", pooling_type=1)
    stack = stack_factory()
    served = stack.cli("doctor")  # the engine answers the embedding model itself
    assert served.returncode == 0, served.stdout
    assert "NOTE  Ollama is not reachable" in served.stdout and "WARN  Ollama" not in \
        served.stdout
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  emb:0.2m-f32:\n    backend: ollama\n    ollama_model: emb:1b\n")
    routed = stack.cli("doctor")
    assert routed.returncode == 0, routed.stdout
    assert f"WARN  Ollama is not reachable at {stack.env['OLLAMA_BASE']}: embeddings with " \
        "ms/emb:0.2m-f32" in routed.stdout, routed.stdout
    assert "fix: start it (`ollama serve`)" in routed.stdout
    # served by the engine, but Ollama has it under a name EMBEDDINGS_TO_OLLAMA matches
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  emb:0.2m-f32:\n    ollama_model: nomic-embed-text:latest\n")
    named = stack.cli("doctor")
    assert "WARN  Ollama is not reachable" in named.stdout and "ms/emb:0.2m-f32" in \
        named.stdout, named.stdout
