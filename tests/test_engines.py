import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from services.engine.__main__ import stop_leftover
from shared import catalog as catalog_mod
from shared.engines import choose, make_engine
from shared.engines.base import section_name
from shared.settings import load
from tests.harness import ROOT, wait
from tests.preset_grammar import parse_preset
from tests.real_engines import llama_swap_bin_dir

CUSTOM = """
models:
  tiny:0.2m-f32:
    sampler_args: "--temp 0.3 --top-nsigma 1.5 --jinja"
    ttl: 60
    aliases: [tiny:latest]
  creative:
    base_model: tiny:0.2m-f32
    sampler_args: "--temp 1.5 --no-warmup"
"""


def _settings(tmp_path, models_dir, config_dir, **env):
    (config_dir / "custom_models.yaml").write_text(CUSTOM)
    return load({"MODELS_DIR": str(models_dir), "STATE_DIR": str(tmp_path / "s"),
                 "CONFIG_DIR": str(config_dir), **env}, env_file=tmp_path / "none")


def test_router_presets_keep_ids_and_settings(tmp_path, models_dir, config_dir) -> None:
    settings = _settings(tmp_path, models_dir, config_dir)
    engine = make_engine(settings)
    assert engine.name == "llama-server router"
    ini = parse_preset(engine.render(catalog_mod.build(settings)))
    tiny = ini[section_name("ms/tiny:0.2m-f32")]
    assert tiny["alias"] == "ms/tiny:0.2m-f32,tiny:latest"
    # the governor unloads at the TTL: a sleeping child would reload behind its back
    assert "sleep-idle-seconds" not in tiny
    assert (tiny["temp"], tiny["top-nsigma"], tiny["jinja"]) == ("0.3", "1.5", "true")
    assert tiny["ctx-size"] == "4096" and tiny["parallel"] == "1"
    creative = ini[section_name("ms/creative")]
    assert creative["model"] == tiny["model"]
    # an alias starts from its base's context and slots, with its own samplers
    assert (creative["temp"], creative["no-warmup"], creative["ctx-size"]) == (
        "1.5", "true", "4096")
    assert "top-nsigma" not in creative
    assert ":" not in section_name("ms/tiny:0.2m-f32")
    cmd = engine.command()
    assert cmd[cmd.index("--models-max") + 1] == "0" and "--no-models-autoload" in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_llama_swap_is_chosen_when_on_path_and_never_swaps(tmp_path, models_dir, config_dir,
                                                         monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{llama_swap_bin_dir(tmp_path)}:{Path('/usr/bin')}:/bin")
    settings = _settings(tmp_path, models_dir, config_dir, LLAMA_SERVER="/opt/llama-server")
    engine = make_engine(settings)
    assert engine.name == "llama-swap"
    config = yaml.safe_load(engine.render(catalog_mod.build(settings)))
    group = config["groups"]["model-serve"]
    assert (group["swap"], group["exclusive"]) == (False, False)
    assert sorted(group["members"]) == sorted(config["models"])
    tiny = config["models"]["ms/tiny:0.2m-f32"]
    assert "ttl" not in tiny and tiny["aliases"] == ["tiny:latest"]
    assert tiny["cmd"].startswith("/opt/llama-server --host 127.0.0.1 --port ${PORT}")
    assert "--temp 0.3 --top-nsigma 1.5" in tiny["cmd"]
    assert "--watch-config" in engine.command()


def test_cmd_override_keeps_the_engine_in_charge_of_port_and_name(tmp_path, models_dir,
                                                                 config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    cmd: llama-server --port ${PORT} -m ${MODEL_PATH} "
        "--temp 0.1\n    ctx_size: 256\n")
    settings = load({"MODELS_DIR": str(models_dir), "STATE_DIR": str(tmp_path / "s"),
                     "CONFIG_DIR": str(config_dir)}, env_file=tmp_path / "none")
    ini = parse_preset(make_engine(settings).render(catalog_mod.build(settings)))
    tiny = ini[section_name("ms/tiny:0.2m-f32")]
    assert (tiny["ctx-size"], tiny["temp"]) == ("256", "0.1")
    assert "port" not in tiny and "m" not in tiny


def test_an_engine_left_as_a_zombie_is_not_waited_for(tmp_path, caplog) -> None:
    """A killed engine service's router that has exited but not been reaped yet: the new
    service starts at once, without claiming it stopped something still running."""
    settings = load({"STATE_DIR": str(tmp_path)}, env_file=tmp_path / "none")
    ended = subprocess.Popen(["true"])
    wait(lambda: psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE, 10)
    (tmp_path / "engine-child.json").write_text(json.dumps(
        {"pid": ended.pid, "started": psutil.Process(ended.pid).create_time()}))
    with caplog.at_level(logging.WARNING):
        stop_leftover(settings)
    assert "left running" not in caplog.text
    ended.wait()


def test_model_commands_drive_the_engine_the_stack_chose(tmp_path, models_dir, config_dir,
                                                         monkeypatch) -> None:
    """The stack started from a shell with llama-swap on PATH (ENGINE=auto); `model sync`
    later from one without it still writes llama-swap's config, not the router's."""
    shell = {k: v for k, v in os.environ.items()
             if not k.startswith(("MODEL", "LLAMA_SWAP", "ENGINE"))}
    monkeypatch.setenv("PATH", f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    settings = _settings(tmp_path, models_dir, config_dir)
    assert choose(settings) == "llama-swap"  # as `model start` records it
    synced = subprocess.run(
        [sys.executable, "-m", "services.cli", "sync"], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
        env={**shell, "MODELS_DIR": str(models_dir), "STATE_DIR": str(settings.state_dir),
             "CONFIG_DIR": str(config_dir), "MODEL_SERVE_ENV_FILE": str(tmp_path / "none")})
    assert synced.returncode == 0, synced.stderr
    assert (settings.state_dir / "llama-swap.yaml").is_file()
    assert not (settings.state_dir / "presets.ini").exists()
