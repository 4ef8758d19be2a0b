"""Prompt caches (issue 21): each engine model gets a --cache-ram sized from the memory
budget, the estimates count it, and a model's footprint is what it took at its last load."""

from __future__ import annotations

import contextlib
import random
import subprocess
from dataclasses import replace

import psutil
import pytest
import yaml

from shared import catalog as catalog_mod
from shared.engines.base import model_options, section_name
from shared.engines.llama_swap import LlamaSwap
from shared.engines.router import Router
from shared.llama_server import find_llama_server
from shared.memory import MIB, Footprints, first_estimate, prompt_cache_bytes, shape
from shared.model_flags import flatten
from shared.settings import SettingsError, load
from shared.tiny_gguf import write_model
from tests.harness import free_port, http, wait
from tests.test_engine_args import options_of, real_router, settings_for, write_config

GIB = 1024**3
TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"


def test_the_default_is_an_eighth_of_what_models_may_take_at_most_llama_servers_own(
        tmp_path) -> None:
    none = tmp_path / "none"
    assert load({}, none, total_memory=16 * GIB).cache_ram_mib == 16 * 1024 * 75 // 100 // 8
    assert load({"MEMORY_PRESSURE_THRESHOLD": "50"}, none,
                total_memory=16 * GIB).cache_ram_mib == 1024
    assert load({}, none, total_memory=512 * GIB).cache_ram_mib == 8192
    assert load({"CACHE_RAM_MIB": "300"}, none, total_memory=16 * GIB).cache_ram_mib == 300
    assert load({"CACHE_RAM_MIB": "0"}, none).cache_ram_mib == 0
    with pytest.raises(SettingsError, match="CACHE_RAM_MIB=-1: must be at least 0"):
        load({"CACHE_RAM_MIB": "-1"}, none)
    with pytest.raises(SettingsError, match="CACHE_RAM_MIB='lots': not a whole number"):
        load({"CACHE_RAM_MIB": "lots"}, none)


CUSTOM = """
models:
  other:0.2m-f32:
    sampler_args: "--temp 0.5 --cache-ram 100"
  big:
    base_model: tiny:0.2m-f32
    ctx_size: 65536
  own:
    cmd: llama-server -m ${MODEL_PATH} -cram 50
    base_model: tiny:0.2m-f32
  pulled:
    base_model: tiny:0.2m-f32
    backend: ollama
    ollama_model: tiny:latest
"""


def cache_ram(entry: catalog_mod.Entry) -> list[list[str]]:
    return [o for o in entry.options if o[0] in ("--cache-ram", "-cram")]


def test_each_engine_model_gets_twice_its_kv_cache_at_most_the_setting(
        tmp_path, models_dir, config_dir) -> None:
    write_config(config_dir, CUSTOM)
    settings = settings_for(tmp_path, models_dir, config_dir, CACHE_RAM_MIB="20")
    catalog = catalog_mod.build(settings)
    entries = catalog.entries
    assert not catalog.notices
    # 2 layers x 4 heads x (16 + 16) x 2 bytes = 512 bytes a token, 4096 tokens, twice
    assert cache_ram(entries[TINY]) == [["--cache-ram", "4"]]
    assert cache_ram(entries["ms/big"]) == [["--cache-ram", "20"]]  # 64 MiB, capped
    assert cache_ram(entries[OTHER]) == [["--cache-ram", "100"]]  # the user's stands
    assert cache_ram(entries["ms/own"]) == [["-cram", "50"]]
    assert cache_ram(entries["ms/pulled"]) == []  # Ollama keeps its own
    assert [prompt_cache_bytes(entries[m]) for m in (TINY, "ms/big", OTHER, "ms/own",
                                                     "ms/pulled")] == [
        4 * MIB, 20 * MIB, 100 * MIB, 50 * MIB, 0]

    ini = Router(settings).render(catalog)
    assert "cache-ram = 4\n" in ini and "cache-ram = 20\n" in ini
    swap = yaml.safe_load(LlamaSwap(settings).render(catalog))["models"]
    assert "--cache-ram 4 " in swap[TINY]["cmd"] + " "
    assert "-cram 50 " in swap["ms/own"]["cmd"] + " "

    off = catalog_mod.build(settings_for(tmp_path, models_dir, config_dir, CACHE_RAM_MIB="0"))
    assert cache_ram(off.entries[TINY]) == [["--cache-ram", "0"]]
    assert prompt_cache_bytes(off.entries[TINY]) == 0


def running_args(path: str) -> list[list[str]]:
    """The command lines of the llama-servers running the model file at `path`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if path in cmdline:
            found.append(cmdline)
    return found


def test_the_router_starts_each_model_with_its_cache_ram(tmp_path, models_dir,
                                                         config_dir) -> None:
    write_config(config_dir, CUSTOM)
    settings = settings_for(tmp_path, models_dir, config_dir)
    engine = Router(settings)
    catalog = catalog_mod.build(settings)
    engine.write_config(catalog)
    with real_router(engine.config_path, tmp_path, settings) as url:
        for mid, wanted in ((TINY, ["4"]), (OTHER, ["100"])):
            name = section_name(mid)
            assert http("POST", url + "/models/load", {"model": name})[0] == 200

            def loaded(name: str = name) -> bool:
                models = {m["id"]: m for m in http("GET", url + "/models")[1]["data"]}
                return models[name]["status"]["value"] == "loaded"

            wait(loaded, timeout=30)
            models = {m["id"]: m for m in http("GET", url + "/models")[1]["data"]}
            assert options_of(models[name]["status"]["args"], settings)["--cache-ram"] == \
                wanted
            [cmdline] = running_args(catalog.entries[mid].path)  # the model's own server
            assert options_of(cmdline, settings)["--cache-ram"] == wanted


def test_the_estimate_counts_the_prompt_cache(tmp_path, models_dir, config_dir) -> None:
    settings = settings_for(tmp_path, models_dir, config_dir)
    tiny = catalog_mod.build(settings).entries[TINY]
    assert first_estimate(tiny) == first_estimate(replace(tiny, options=[])) + 4 * MIB
    footprints = Footprints(tmp_path / "footprints.json")
    assert footprints.estimate("engine:" + TINY, tiny, "engine") == first_estimate(tiny)
    footprints.learn("engine:" + TINY, shape(tiny, "engine"), 300 * MIB)
    assert footprints.estimate("engine:" + TINY, tiny, "engine") == 304 * MIB


def test_a_load_measured_small_keeps_room_for_its_whole_context(tmp_path, models_dir,
                                                                 config_dir) -> None:
    """Right after a load its KV pages are untouched: the reading is smaller than the model
    will be once a long conversation fills them, so it does not lower the estimate."""
    settings = settings_for(tmp_path, models_dir, config_dir)
    tiny = catalog_mod.build(settings).entries[TINY]
    footprints = Footprints(tmp_path / "footprints.json")
    footprints.learn("engine:" + TINY, shape(tiny, "engine"), 1 * MIB)
    assert footprints.estimate("engine:" + TINY, tiny, "engine") == first_estimate(tiny)


def test_learning_replaces_an_old_larger_footprint(tmp_path, models_dir, config_dir) -> None:
    settings = settings_for(tmp_path, models_dir, config_dir)
    tiny = catalog_mod.build(settings).entries[TINY]
    key, file = "engine:" + TINY, tmp_path / "footprints.json"
    old = Footprints(file)
    assert old.learn(key, shape(tiny, "engine"), 40 * GIB)  # a busy model's lifetime high
    old.save()

    footprints = Footprints(file)
    assert footprints.estimate(key, tiny, "engine") == 40 * GIB + 4 * MIB
    assert footprints.learn(key, shape(tiny, "engine"), 300 * MIB)
    assert not footprints.learn(key, shape(tiny, "engine"), 300 * MIB)  # nothing to save
    footprints.save()
    assert Footprints(file).estimate(key, tiny, "engine") == 304 * MIB
    # another context: what was learned for the old one no longer counts
    tiny.ctx_size = 1024
    assert Footprints(file).estimate(key, tiny, "engine") == first_estimate(tiny)


def _growth(argv: list[str], prompts: list[str]) -> int:
    """How much a llama-server's memory grows over `prompts`, from after the first: its
    compute buffers are then in use, and only what it keeps of prompts is left to grow."""
    port = free_port()
    proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None
            with contextlib.suppress(OSError):
                return http("GET", url + "/health", timeout=2)[0] == 200
            return False

        wait(up, timeout=30)
        sizes = []
        for prompt in prompts:
            status, _ = http("POST", url + "/completion",
                             {"prompt": prompt, "n_predict": 1, "cache_prompt": True})
            assert status == 200
            sizes.append(psutil.Process(proc.pid).memory_info().rss)
        return sizes[-1] - sizes[0]
    finally:
        proc.terminate()
        proc.wait(15)


def test_cache_ram_bounds_what_a_busy_model_grows_by(tmp_path, config_dir) -> None:
    """Ten different prompts of about 1000 tokens, each kept in the prompt cache as about
    4 MiB of KV cache: llama-server's default keeps them all, the stack's --cache-ram 8
    (CACHE_RAM_MIB; twice this model's KV cache would be 16) about two."""
    models = tmp_path / "models"
    write_model(models / "pub" / "wide" / "wide-F32.gguf", name="wide", n_embd=256,
                n_layer=4)
    settings = settings_for(tmp_path, models, config_dir, CACHE_RAM_MIB="8",
                            DEFAULT_CTX_SIZE="2048")
    entry = next(iter(catalog_mod.build(settings).entries.values()))
    assert cache_ram(entry) == [["--cache-ram", "8"]]
    run = [find_llama_server(settings), "-m", entry.path]
    options = model_options(entry)
    rng = random.Random(1)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(1000))
               for _ in range(10)]
    bounded = _growth(run + flatten(options), prompts)
    unbounded = _growth(run + flatten([o for o in options if o[0] != "--cache-ram"]), prompts)
    assert unbounded > 30 * MIB, unbounded
    assert bounded < prompt_cache_bytes(entry) + 8 * MIB, bounded
