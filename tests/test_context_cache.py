"""A conversation survives its model's leaving: real llama-server processes save each slot
before the model is unloaded and restore it at its next load (services/proxy/models/
context_cache.py)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.governed import events, measured, running, unloaded
from tests.harness import http, wait
from tests.real_engines import llama_swap_bin_dir

MIB = 1024**2
ALPHA, TWIN = "ms/alpha:40.0m-f32", "ms/alpha-twin"
TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
# about 2,000 tokens of the generated models' vocabulary
LONG = " ".join(f"note {i} on the plan;" for i in range(66))


def conversation(model: str) -> list[dict]:
    return [{"role": "system", "content": "You keep notes."},
            {"role": "user", "content": LONG}]


def ask(stack, model: str, messages: list[dict], max_tokens: int = 8) -> dict:
    status, body = http("POST", stack.url + "/v1/chat/completions", {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        timeout=300)
    assert status == 200, body
    return body


def next_turn(messages: list[dict], answer: dict) -> list[dict]:
    return [*messages, {"role": "assistant", "content": answer["choices"][0]["message"]
                        ["content"]}, {"role": "user", "content": "And the next step?"}]


def saved(stack) -> list[str]:
    folder = stack.state_dir / "context-cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def long_stack(stack_factory, gov_models, config_dir):
    """alpha (150 MiB) with room for the conversation, and its twin (the same file, its
    own server) that is never unloaded."""
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  alpha:40.0m-f32:\n    ctx_size: 4096\n    ttl: 3600\n"
        "  alpha-twin:\n    base_model: alpha:40.0m-f32\n    ttl: 3600\n")

    def make(*services: str, **env: str):
        return stack_factory(MODELS_DIR=str(gov_models), MIN_MODEL_AGE_SECONDS="0",
                             PRESSURE_CHECK_INTERVAL="0.2", **env).start(*services)
    return make


def leave_by_hand(stack) -> None:
    status, body = http("POST", stack.url + "/models/unload", {"model": ALPHA})
    assert status == 200, body


def leave_by_ttl(stack, config_dir) -> None:
    text = (config_dir / "custom_models.yaml").read_text()
    (config_dir / "custom_models.yaml").write_text(
        text.replace("ctx_size: 4096\n    ttl: 3600", "ctx_size: 4096\n    ttl: 1"))
    assert stack.cli("sync").returncode == 0
    wait(lambda: (ALPHA, "ttl") in unloaded(stack), 30)


@pytest.mark.parametrize("leave", ["by hand", "by TTL"])
def test_a_conversation_goes_on_from_its_saved_cache_after_its_model_left(
        long_stack, config_dir, leave) -> None:
    stack = long_stack("engine", "proxy", "governor")
    messages = conversation(ALPHA)
    first = ask(stack, ALPHA, messages)
    prefix = first["usage"]["prompt_tokens"]
    assert prefix >= 1900 and first["timings"]["cache_n"] == 0
    cold = first["timings"]  # a cold prefill of the whole prefix

    # the same turns on a model that never leaves: what the answer must be
    twin = ask(stack, TWIN, next_turn(messages, ask(stack, TWIN, messages)))

    if leave == "by hand":
        leave_by_hand(stack)
    else:
        leave_by_ttl(stack, config_dir)
    assert ALPHA not in {m["id"] for m in http("GET", stack.url + "/running")[1]["models"]}
    [save] = [e for e in events(stack) if e["kind"] == "context_saved"]
    assert save["model"] == ALPHA and save["tokens"] >= prefix
    assert len(saved(stack)) == 1

    second = ask(stack, ALPHA, next_turn(messages, first))
    timings = second["timings"]
    assert timings["cache_n"] >= 0.9 * prefix  # the prefix came from the saved cache
    assert timings["prompt_n"] <= cold["prompt_n"] / 4  # only the new turn was prefilled
    print(f"\nprefill of {prefix} tokens cold: {cold['prompt_ms']:.0f} ms; next turn after a "
          f"restore: {timings['prompt_ms']:.0f} ms for {timings['prompt_n']} new tokens")
    assert second["choices"][0]["message"]["content"] == \
        twin["choices"][0]["message"]["content"]
    [restore] = [e for e in events(stack) if e["kind"] == "context_restored"]
    assert restore["model"] == ALPHA and restore["tokens"] >= prefix
    kinds = [e["kind"] for e in events(stack) if e["model"] == ALPHA]
    # restored within the load, so before any request went through
    assert kinds[-3:] == ["loading", "context_restored", "loaded"]
    metrics = http("GET", stack.url + "/metrics")[1]
    assert f'model_serve_context_restores_total{{backend="engine",model="{ALPHA}"}} 1.0' in metrics
    running = http("GET", stack.url + "/running")[1]
    assert running["contexts"]["models"][ALPHA]["tokens"] >= prefix


def test_a_corrupted_saved_cache_gives_a_normal_answer(stack_factory) -> None:
    stack = stack_factory().start()
    messages = conversation(TINY)
    first = ask(stack, TINY, messages)
    http("POST", stack.url + "/models/unload", {"model": TINY})
    [name] = saved(stack)
    path = stack.state_dir / "context-cache" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = os.urandom(len(data) - len(data) // 2)  # its KV data spoiled
    path.write_bytes(bytes(data[: len(data) * 3 // 4]))  # and cut short

    second = ask(stack, TINY, next_turn(messages, first))
    assert second["timings"]["cache_n"] < 0.5 * first["usage"]["prompt_tokens"]
    [failed] = [e for e in events(stack) if e["kind"] == "context_restore_failed"]
    assert failed["model"] == TINY and failed["reason"] == "refused"
    assert not (stack.state_dir / "context-cache" / name).exists()  # dropped
    metrics = http("GET", stack.url + "/metrics")[1]
    assert (f'model_serve_context_restore_failures_total{{backend="engine",model="{TINY}",'
            'reason="refused"} 1.0') in metrics


def test_the_folder_stays_within_its_budget_least_recently_used_first(stack_factory) -> None:
    stack = stack_factory(CONTEXT_CACHE_GB=str(1.5 * MIB / 1024**3)).start()
    for model in (TINY, OTHER):
        ask(stack, model, conversation(model), max_tokens=2)
        http("POST", stack.url + "/models/unload", {"model": model})
    contexts = http("GET", stack.url + "/running")[1]["contexts"]
    sizes = [(stack.state_dir / "context-cache" / n).stat().st_size for n in saved(stack)]
    assert sum(sizes) <= contexts["budget"] == int(1.5 * MIB)
    # each file alone fits, both do not: the one saved first (tiny's) has gone
    assert list(contexts["models"]) == [OTHER] and len(sizes) == 1
    assert contexts["used"] == sum(sizes)


def test_files_it_did_not_write_are_left_alone(stack_factory, tmp_path) -> None:
    folder = tmp_path / "state" / "context-cache"
    folder.mkdir(parents=True)
    theirs = [folder / "notes.txt", folder / ("0" * 20 + "-slot0.bin.bak")]
    for path in theirs:
        path.write_text("mine")
    stack = stack_factory(CONTEXT_CACHE_GB=str(2.5 * MIB / 1024**3)).start()
    for _ in range(2):
        ask(stack, TINY, conversation(TINY), max_tokens=2)
        http("POST", stack.url + "/models/unload", {"model": TINY})
    assert all(p.read_text() == "mine" for p in theirs)


def test_a_model_that_changed_loses_its_saved_cache(stack_factory, models_dir,
                                                   config_dir) -> None:
    stack = stack_factory().start()
    ask(stack, TINY, conversation(TINY), max_tokens=2)
    http("POST", stack.url + "/models/unload", {"model": TINY})
    assert len(saved(stack)) == 1
    # another context: the saved cache does not fit it, and goes once the catalog has it
    (config_dir / "custom_models.yaml").write_text("models:\n  tiny:0.2m-f32:\n"
                                                   "    ctx_size: 3072\n")
    assert stack.cli("sync").returncode == 0
    wait(lambda: saved(stack) == [], 10)

    ask(stack, TINY, conversation(TINY), max_tokens=2)
    http("POST", stack.url + "/models/unload", {"model": TINY})
    assert len(saved(stack)) == 1
    path = next(models_dir.rglob("tiny-F32.gguf"))
    shutil.copyfile(path, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # rewritten: the same bytes, a new file
    os.utime(path, (time.time() + 10, time.time() + 10))
    stack.restart("proxy")  # the proxy looks at the folder when it starts
    wait(lambda: saved(stack) == [], 10)


def test_a_stack_stop_saves_and_the_next_start_restores(stack_factory) -> None:
    stack = stack_factory().start()
    messages = conversation(TINY)
    first = ask(stack, TINY, messages)
    stack.restart("proxy")  # stopped first, as `model stop` does, while the engine runs
    assert len(saved(stack)) == 1
    stack.stop()
    stack.start("engine", "proxy")
    second = ask(stack, TINY, next_turn(messages, first))
    assert second["timings"]["cache_n"] >= 0.9 * first["usage"]["prompt_tokens"]


def test_context_cache_gb_0_saves_nothing_and_keeps_what_was_saved(stack_factory) -> None:
    stack = stack_factory().start()
    ask(stack, TINY, conversation(TINY), max_tokens=2)
    http("POST", stack.url + "/models/unload", {"model": TINY})
    kept = saved(stack)
    assert len(kept) == 1
    stack.stop()

    stack.env["CONTEXT_CACHE_GB"] = "0"  # turned off for a while
    stack.start()
    ask(stack, TINY, conversation(TINY), max_tokens=2)
    http("POST", stack.url + "/models/unload", {"model": OTHER})
    http("POST", stack.url + "/models/unload", {"model": TINY})
    assert not [e for e in events(stack) if e["kind"].startswith("context_")]
    assert "slot-save-path" not in (stack.state_dir / "presets.ini").read_text()
    time.sleep(1.5)  # the proxy's first look at the catalog has come and gone
    assert saved(stack) == kept  # nothing written, nothing removed


@pytest.mark.parametrize("leave", ["by hand", "by a reload of its config"])
def test_under_llama_swap_too(stack_factory, tmp_path, config_dir, leave) -> None:
    path = f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    stack = stack_factory(ENGINE="llama-swap", PATH=path).start()
    messages = conversation(TINY)
    first = ask(stack, TINY, messages)
    if leave == "by hand":
        assert http("POST", stack.url + "/models/unload", {"model": TINY})[0] == 200
    else:  # llama-swap stops every model to take up a new config
        (config_dir / "custom_models.yaml").write_text(
            "models:\n  other:0.2m-f32:\n    ctx_size: 1024\n")
        assert stack.cli("sync").returncode == 0
        wait(lambda: (TINY, "engine-reload") in unloaded(stack), 30)
    assert len(saved(stack)) == 1
    second = ask(stack, TINY, next_turn(messages, first))
    assert second["timings"]["cache_n"] >= 0.9 * first["usage"]["prompt_tokens"]


@pytest.mark.parametrize("kept", [True, False])
def test_memory_pressure_counts_what_bringing_a_context_back_would_cost(
        stack_factory, gov_models, config_dir, machine, kept) -> None:
    """alpha holds a long conversation and was used first, bravo a moment later. With saved
    contexts alpha, the least recently used, leaves; without, bringing alpha back would
    cost its whole prefill again, so bravo leaves instead."""
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  alpha:40.0m-f32:\n    ctx_size: 4096\n"
        "  bravo:40.0m-f32:\n    ctx_size: 4096\n")
    stack = stack_factory(
        MODELS_DIR=str(gov_models), MIN_MODEL_AGE_SECONDS="0", PRESSURE_CHECK_INTERVAL="0.2",
        MEMORY_SIMULATION_FILE=str(machine.file), CONTEXT_CACHE_GB="8" if kept else "0",
    ).start("engine", "proxy", "governor")
    bravo = "ms/bravo:40.0m-f32"
    ask(stack, ALPHA, conversation(ALPHA))
    ask(stack, bravo, [{"role": "user", "content": "hi"}], max_tokens=2)
    rows = running(stack)
    assert rows[ALPHA]["last_used"] < rows[bravo]["last_used"]
    assert rows[ALPHA]["reload"]["context_saved"] is kept
    assert (rows[ALPHA]["reload"]["prefill"] > 1) is not kept
    sizes = measured(stack)
    # over the limit by half a model: one of them leaves
    machine(total=int((sizes[ALPHA] + sizes[bravo] - min(sizes.values()) / 2) / 0.75))
    wait(lambda: len(running(stack)) == 1, 20)
    leaving = ALPHA if kept else bravo
    assert unloaded(stack) == [(leaving, "pressure")]


def test_a_restart_of_the_engine_saves_and_says_so(stack_factory) -> None:
    stack = stack_factory().start()
    messages = conversation(TINY)
    first = ask(stack, TINY, messages)
    stack.restart("engine")  # as `model restart engine` does: the engine service alone
    assert (TINY, "engine-restart") in unloaded(stack)
    assert not [r for r in unloaded(stack) if r[1] in ("crash", "config-restart")]
    assert len(saved(stack)) == 1
    wait(lambda: http("GET", stack.url + "/health")[1]["engine"]["ok"], 30)
    second = ask(stack, TINY, next_turn(messages, first))
    assert second["timings"]["cache_n"] >= 0.9 * first["usage"]["prompt_tokens"]
