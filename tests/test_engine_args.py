"""Per-model settings: checked against the installed llama-server before anything is written,
and rendered by each engine so that no file name, alias or value can change the config's
structure. The router tests start the real llama-server on the rendered presets.ini."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shared import catalog as catalog_mod
from shared import engine_options
from shared.catalog import Catalog
from shared.engines.base import section_name
from shared.engines.llama_swap import LlamaSwap
from shared.engines.router import Router
from shared.llama_server import find_llama_server
from shared.model_flags import split
from shared.settings import Settings, load
from shared.sync import rebuild
from shared.tiny_gguf import write_model
from tests.harness import free_port, http, wait
from tests.preset_grammar import DEFAULT, parse_preset

PLAIN, SPACE = "ms/plain:0.2m-f32", "ms/spa-ce:0.2m-f32"
SEMI, HASH, NEWLINE = "ms/se-mi:0.2m-f32", "ms/ha-sh:0.2m-f32", "ms/new-line:0.2m-f32"


def settings_for(tmp_path: Path, models: Path, config: Path, **env: str) -> Settings:
    return load({"MODELS_DIR": str(models), "STATE_DIR": str(tmp_path / "state"),
                 "CONFIG_DIR": str(config), **env}, env_file=tmp_path / "none")


def write_config(config: Path, text: str) -> None:
    (config / "custom_models.yaml").write_text(text)


@contextlib.contextmanager
def real_router(presets: Path, tmp_path: Path, settings: Settings) -> Iterator[str]:
    """The real llama-server router on `presets`, as the engine starts it; its URL."""
    port = free_port()
    cache = tmp_path / "llama-cache"
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_API_KEY"}
    log = open(tmp_path / "router.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [find_llama_server(settings), "--models-preset", str(presets), "--models-max", "0",
         "--no-models-autoload", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "LLAMA_CACHE": str(cache)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "router.log").read_text()
        with contextlib.suppress(OSError):
            return http("GET", url + "/models", timeout=2)[0] == 200
        return False

    try:
        wait(up, timeout=30)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def router_models(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in http("GET", url + "/models")[1]["data"]}


def options_of(args: list[str], settings: Settings) -> dict[str, list[str]]:
    """A model's command line as the router reports it → flag → values."""
    table = engine_options.installed(settings)
    options, problems = split(args[1:], table)
    assert not problems
    return {option[0]: option[1:] for option in options}


# ---- llama-server's own option list -------------------------------------------------------

def test_the_option_table_is_read_from_llama_servers_help(tmp_path, models_dir,
                                                          config_dir) -> None:
    values = engine_options.installed(settings_for(tmp_path, models_dir, config_dir)).values
    assert values["-c"] == values["--ctx-size"] == 1
    assert values["--temp"] == values["--temperature"] == 1
    assert values["--jinja"] == values["--no-jinja"] == 0
    assert values["-kvo"] == values["-nkvo"] == values["--no-kv-offload"] == 0
    assert values["-fa"] == values["--flash-attn"] == 1  # `[on|off|auto]` is one value
    assert values["-ot"] == values["--override-tensor"] == 1  # blanks inside <...>
    assert values["--lora-scaled"] == 1  # FNAME:SCALE,... in this llama-server
    assert values["--control-vector-layer-range"] == 2
    assert "--temprature" not in values and "--alias" in values


def test_the_help_is_run_once_per_binary_and_again_when_it_changes(tmp_path, models_dir,
                                                                   config_dir) -> None:
    real = find_llama_server(settings_for(tmp_path, models_dir, config_dir))
    help_text = tmp_path / "help.txt"
    help_text.write_text(subprocess.run([real, "--help"], capture_output=True,
                                        text=True).stdout)
    runs = tmp_path / "runs"
    fake = tmp_path / "bin" / "llama-server"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\ncat {help_text}\n")
    fake.chmod(0o755)
    state = tmp_path / "state"

    first = engine_options.read(str(fake), state)
    assert engine_options.read(str(fake), state) == first
    assert runs.read_text().count("run") == 1  # the second came from STATE_DIR's cache
    assert (state / "llama-server-options.json").is_file()
    stat = fake.stat()
    os.utime(fake, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rebuilt binary
    assert engine_options.read(str(fake), state).values == first.values
    assert runs.read_text().count("run") == 2

    with pytest.raises(engine_options.OptionsError, match="not a llama-server"):
        engine_options.read("/bin/true", state)


def test_without_a_llama_server_flags_are_grouped_unchecked(tmp_path, models_dir, config_dir,
                                                            caplog) -> None:
    write_config(config_dir, "models:\n  tiny:0.2m-f32:\n    sampler_args: --temprature 1.3\n")
    settings = settings_for(tmp_path, models_dir, config_dir,
                            LLAMA_SERVER=str(tmp_path / "no-such-llama-server"))
    for _ in range(2):
        tiny = catalog_mod.build(settings).entries["ms/tiny:0.2m-f32"]
        assert tiny.options == [["--temprature", "1.3"]]
    said = [r.getMessage() for r in caplog.records if "not checked" in r.getMessage()]
    assert len(said) == 1 and "no-such-llama-server" in said[0]


# ---- what custom_models.yaml may say ------------------------------------------------------

def test_a_mistyped_flag_is_reported_and_never_reaches_presets(stack_factory, config_dir,
                                                               tmp_path) -> None:
    write_config(config_dir, """
models:
  tiny:0.2m-f32:
    sampler_args: "--temprature 1.3 --top-k 40"
  other:0.2m-f32:
    sampler_args: "--temp 0.7"
""")
    stack = stack_factory()
    result = stack.cli("sync")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "models.tiny:0.2m-f32.sampler_args: --temprature: not an option of " in result.stderr
    assert "(did you mean --temperature?)" in result.stderr
    presets = stack.state_dir / "presets.ini"
    text = presets.read_text()
    assert "temprature" not in text
    ini = parse_preset(text)
    assert ini[section_name("ms/other:0.2m-f32")]["temp"] == "0.7"
    assert "top-k" not in ini[section_name("ms/tiny:0.2m-f32")]  # its entry left out whole
    settings = load(stack.env)
    with real_router(presets, tmp_path, settings) as url:
        assert set(router_models(url)) == {section_name("ms/tiny:0.2m-f32"),
                                           section_name("ms/other:0.2m-f32")}


@pytest.mark.parametrize(("sampler_args", "problem"), [
    ("--lora-scaled a.gguf 0.5", "'0.5': not an option (--lora-scaled before it takes 1 value)"),
    ("--temp", "--temp: takes 1 value, got 0"),
    ("--temp --top-k 40", "--temp: takes 1 value, got 0"),
    ("0.7", "'0.7': not an option"),
    ("--port 9999", "--port: set by the engine; the engine chooses each model's address"),
    ("-m /etc/x.gguf", "-m: set by the engine; the model file comes from the catalog"),
    ("--alias x", "--alias: set by the engine; set `aliases:` instead"),
    ("--api-key secret", "--api-key: set by the engine; the engine sets the API key"),
    ("-c 512", "-c: set by the engine; set `ctx_size:` instead"),
    ("--models-max 3", "--models-max: set by the engine"),
    ("--lora ${MODEL_PATH}.lora", "--lora ${MODEL_PATH}.lora: only ${MODEL_PATH}, and "),
])
def test_bad_sampler_args_are_problems_naming_file_model_and_key(
        tmp_path, models_dir, config_dir, sampler_args, problem) -> None:
    write_config(config_dir, f"models:\n  tiny:0.2m-f32:\n    sampler_args: {sampler_args!r}\n")
    settings = settings_for(tmp_path, models_dir, config_dir)
    catalog = catalog_mod.build(settings)
    where = f"{config_dir / 'custom_models.yaml'}: models.tiny:0.2m-f32.sampler_args: "
    assert any(n.startswith(where + problem) for n in catalog.notices), catalog.notices
    # served with the defaults, its prompt cache and where its slots are saved among them
    assert catalog.entries["ms/tiny:0.2m-f32"].options == [
        ["--cache-ram", "4"], ["--slot-save-path", str(settings.context_cache_dir)]]


def test_cmd_is_one_llama_server_command(tmp_path, models_dir, config_dir) -> None:
    write_config(config_dir, """
models:
  tiny:0.2m-f32:
    cmd: llama-server -m ${MODEL_PATH} --port ${PORT} --temp 0.1 -ot 'blk.*=CPU'
    ctx_size: 256
  shell:
    cmd: llama-server -m /x.gguf --port ${PORT} && rm -rf /tmp/x
  piped:
    cmd: llama-server -m /x.gguf | tee log
  echo:
    cmd: /bin/echo -m /x.gguf
  ctx:
    cmd: llama-server -m /x.gguf -c 4096
  macro:
    cmd: llama-server -m /x.gguf --alias ${PORT}
""")
    settings = settings_for(tmp_path, models_dir, config_dir)
    catalog = catalog_mod.build(settings)
    tiny = catalog.entries["ms/tiny:0.2m-f32"]
    assert tiny.options == [["--temp", "0.1"], ["-ot", "blk.*=CPU"], ["--cache-ram", "1"],
                            ["--slot-save-path", str(settings.context_cache_dir)]]
    assert tiny.binary == find_llama_server(settings) and tiny.ctx_size == 256
    notices = "\n".join(catalog.notices)
    assert "models.shell.cmd: &&: shell syntax; no shell runs `cmd`" in notices
    assert "models.piped.cmd: |: shell syntax" in notices
    assert "models.echo.cmd: /bin/echo: the command must run a llama-server" in notices
    assert "models.ctx.cmd: -c: set by the engine; set `ctx_size:` instead" in notices
    assert "models.macro.cmd: --alias: set by the engine" in notices
    assert set(catalog.entries) == {"ms/tiny:0.2m-f32", "ms/other:0.2m-f32"}

    ini = parse_preset(Router(settings).render(catalog))[section_name("ms/tiny:0.2m-f32")]
    assert (ini["model"], ini["ctx-size"], ini["temp"], ini["ot"]) == (
        tiny.path, "256", "0.1", "blk.*=CPU")
    assert "port" not in ini and "m" not in ini
    swap = yaml.safe_load(LlamaSwap(settings).render(catalog))["models"]["ms/tiny:0.2m-f32"]
    argv = shlex.split(swap["cmd"])
    assert argv[0] == tiny.binary and argv[argv.index("--model") + 1] == tiny.path
    assert argv[argv.index("--ctx-size") + 1] == "256" and "blk.*=CPU" in argv


def test_the_router_runs_only_its_own_binary(tmp_path, models_dir, config_dir) -> None:
    real = find_llama_server(settings_for(tmp_path, models_dir, config_dir))
    other = tmp_path / "bin" / "llama-server-custom"
    other.parent.mkdir()
    other.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    other.chmod(0o755)
    write_config(config_dir, f"models:\n  tiny:0.2m-f32:\n    cmd: {other} -m ${{MODEL_PATH}}"
                             " --temp 0.2\n")
    settings = settings_for(tmp_path, models_dir, config_dir)
    catalog = catalog_mod.build(settings)
    reason = Router(settings).refusals(catalog)["ms/tiny:0.2m-f32"]
    assert "the router runs only its own llama-server" in reason
    assert "use ENGINE=llama-swap to run another binary" in reason
    swap = yaml.safe_load(LlamaSwap(settings).render(catalog))["models"]
    assert shlex.split(swap["ms/tiny:0.2m-f32"]["cmd"])[0] == str(other)


# ---- what each engine can hold ------------------------------------------------------------

@pytest.fixture
def awkward(tmp_path: Path, config_dir: Path) -> Settings:
    """Models whose file names, aliases and flags the preset grammar cannot all hold."""
    root = tmp_path / "models"
    write_model(root / "pub" / "plain" / "plain-F32.gguf", name="plain")
    write_model(root / "pub" / "with space" / "spa ce-F32.gguf", name="space")
    write_model(root / "pub" / "semi" / "se;mi-F32.gguf", name="semi")
    write_model(root / "pub" / "hash" / "ha#sh-F32.gguf", name="hash")
    write_model(root / "pub" / "nl" / "new\nline-F32.gguf", name="newline")
    write_config(config_dir, r"""
models:
  plain:0.2m-f32:
    sampler_args: "--temp 0.7 --top-k 40 --jinja -ot 'blk.*=CPU'"
    aliases: [plain:latest]
  spa-ce:0.2m-f32:
    sampler_args: "--lora-scaled 'a b.gguf:0.5' --temp 0.5"
  injector:
    base_model: plain:0.2m-f32
    aliases: ["x\n[injected]\nmodel = /etc/passwd"]
  semicolon-alias:
    base_model: plain:0.2m-f32
    aliases: ["cut;here", "kept"]
  hash-alias:
    base_model: plain:0.2m-f32
    aliases: ["tag#1"]
  comma:
    base_model: plain:0.2m-f32
    aliases: ["a,b", " edge "]
  newline-value:
    base_model: plain:0.2m-f32
    sampler_args: "--chat-template-kwargs '{\"a\":\n1.50}' --temp 0.1"
  semicolon-value:
    base_model: plain:0.2m-f32
    sampler_args: "--chat-template-kwargs '{\"a\": \";\"}'"
  hashed-value:
    base_model: plain:0.2m-f32
    sampler_args: "--chat-template-kwargs '{\"tag\": \"#1\"}'"
  samplers:
    base_model: plain:0.2m-f32
    sampler_args: "--samplers 'top_k;Min-P;;temp' --temp 0.2"
  unknown-sampler:
    base_model: plain:0.2m-f32
    sampler_args: "--samplers 'top_k;nope' --top-k 3"
  hashed-template:
    base_model: plain:0.2m-f32
    sampler_args: "--chat-template 'x#y' --top-k 4"
  two-values:
    base_model: plain:0.2m-f32
    sampler_args: "--control-vector-layer-range 1 2"
  we;ird:
    base_model: plain:0.2m-f32
  plain_0.2m-f32:
    base_model: plain:0.2m-f32
""")
    return settings_for(tmp_path, root, config_dir)


# a model the router cannot ask for by its id, or whose section would be another's
ROUTER_REFUSES = {
    "ms/we;ird": "name 'ms/we;ird' contains ';', which llama-server's preset file cannot "
                 "hold; rename it in custom_models.yaml or use ENGINE=llama-swap",
    "ms/plain_0.2m-f32": f"'ms_plain_0.2m-f32' is already {PLAIN}'s name in the router's "
                         "presets",
}
# a value it cannot hold in any spelling: the model is served without it
ROUTER_LEAVES_OUT = {
    "ms/unknown-sampler": "--samplers 'top_k;nope': it contains ';', which llama-server's "
                          "preset file cannot hold, and llama-server knows no sampler 'nope'",
    "ms/hashed-template": "--chat-template 'x#y': it contains '#', which llama-server's "
                          "preset file cannot hold; change it in custom_models.yaml or use "
                          "ENGINE=llama-swap",
    "ms/two-values": "--control-vector-layer-range '1' '2': it takes 2 values, which "
                     "llama-server's presets cannot hold yet",
}


def test_the_router_holds_every_value_another_way_or_leaves_out_only_that_value(
        awkward, tmp_path) -> None:
    engine = Router(awkward)
    result = rebuild(awkward, engine)
    notices = result.catalog.notices
    for mid, reason in ROUTER_REFUSES.items():
        assert f"{mid}: not served by llama-server router: {reason}" in "\n".join(notices)
        assert mid not in result.catalog.entries  # clients are not offered it either
    for mid, value in ROUTER_LEAVES_OUT.items():
        assert any(n.startswith(f"{mid}: llama-server router serves it without {value}")
                   for n in notices), (mid, notices)
    assert len([n for n in notices if "router" in n]) == len(ROUTER_REFUSES) + len(
        ROUTER_LEAVES_OUT)
    served = set(result.catalog.entries)
    assert served == set(catalog_mod.build(awkward).entries) - set(ROUTER_REFUSES)
    assert result.catalog.resolve("cut;here").id == "ms/semicolon-alias"  # the proxy's names

    text = engine.config_path.read_text()
    ini = parse_preset(text)
    assert set(ini) == {DEFAULT} | {section_name(mid) for mid in served}
    assert "injected" not in text and "passwd" not in text
    plain, space = ini[section_name(PLAIN)], ini[section_name(SPACE)]
    assert (plain["alias"], plain["temp"], plain["ot"]) == (
        f"{PLAIN},plain:latest", "0.7", "blk.*=CPU")
    assert space["model"] == result.catalog.entries[SPACE].path  # the blank kept
    assert space["lora-scaled"] == "a b.gguf:0.5"
    # an alias it cannot hold is the proxy's alone; the rest of the model stays
    assert ini[section_name("ms/semicolon-alias")]["alias"] == "ms/semicolon-alias,kept"
    for mid in ("ms/injector", "ms/hash-alias", "ms/comma"):
        assert ini[section_name(mid)]["alias"] == mid
    # the same JSON on one line, `;` and `#` escaped; the numbers as written
    kwargs = {mid: ini[section_name(mid)]["chat-template-kwargs"]
              for mid in ("ms/newline-value", "ms/semicolon-value", "ms/hashed-value")}
    assert kwargs == {"ms/newline-value": '{"a":1.50}', "ms/semicolon-value": r'{"a":"\u003b"}',
                      "ms/hashed-value": r'{"tag":"\u00231"}'}
    assert ini[section_name("ms/samplers")]["sampling-seq"] == "kmt"
    assert "samplers" not in ini[section_name("ms/samplers")]
    assert ini[section_name("ms/unknown-sampler")]["top-k"] == "3"
    assert ini[section_name("ms/hashed-template")]["top-k"] == "4"
    # a file whose path it cannot hold, through a link of the project's in STATE_DIR
    for mid in (SEMI, HASH, NEWLINE):
        link = Path(ini[section_name(mid)]["model"])
        assert link.is_relative_to(awkward.state_dir / "model-links")
        assert os.readlink(link) == result.catalog.entries[mid].path

    with real_router(engine.config_path, tmp_path, awkward) as url:
        models = router_models(url)
        assert set(models) == {section_name(mid) for mid in served}
        assert models[section_name(PLAIN)]["aliases"] == [PLAIN, "plain:latest"]
        plain_args = options_of(models[section_name(PLAIN)]["status"]["args"], awkward)
        assert plain_args["--temperature"] == ["0.7"] and plain_args["--top-k"] == ["40"]
        assert plain_args["--override-tensor"] == ["blk.*=CPU"] and "--jinja" in plain_args
        space_args = options_of(models[section_name(SPACE)]["status"]["args"], awkward)
        assert space_args["--model"] == [result.catalog.entries[SPACE].path]
        assert space_args["--lora-scaled"] == ["a b.gguf:0.5"]
        hashed = options_of(models[section_name("ms/hashed-value")]["status"]["args"], awkward)
        assert json.loads(hashed["--chat-template-kwargs"][0]) == {"tag": "#1"}
        seq = options_of(models[section_name("ms/samplers")]["status"]["args"], awkward)
        assert seq["--sampling-seq"] == ["kmt"]


def test_the_links_follow_the_catalog_and_touch_nothing_else(awkward, tmp_path) -> None:
    engine = Router(awkward)
    rebuild(awkward, engine)
    links = awkward.state_dir / "model-links"
    assert len(list(links.iterdir())) == 3
    # the first shard's link has its other shards beside it, as llama-server looks for them
    split = awkward.models_dir / "pub" / "split#" / "big-00001-of-00002.gguf"
    write_model(split, name="big")
    write_model(split.with_name("big-00002-of-00002.gguf"), name="big", seed=2)
    rebuild(awkward, engine)
    first = Path(parse_preset(engine.config_path.read_text())[
        section_name("ms/big:0.2m-f32")]["model"])
    assert sorted(p.name for p in first.parent.iterdir()) == [
        "big-00001-of-00002.gguf", "big-00002-of-00002.gguf"]
    assert os.readlink(first.with_name("big-00002-of-00002.gguf")) == str(
        split.with_name("big-00002-of-00002.gguf"))
    # a file gone: its link goes, the file a link pointed at never does
    (awkward.models_dir / "pub" / "hash" / "ha#sh-F32.gguf").unlink()
    shutil.rmtree(split.parent)
    rebuild(awkward, engine)
    assert len(list(links.iterdir())) == 2
    assert (awkward.models_dir / "pub" / "semi" / "se;mi-F32.gguf").is_file()


def test_llama_swap_quotes_what_it_can_and_leaves_out_what_its_cmd_would_change(
        awkward) -> None:
    catalog = catalog_mod.build(awkward)
    engine = LlamaSwap(awkward)
    assert engine.refusals(catalog) == {}
    assert engine.left_out(catalog) == {}
    models = yaml.safe_load(engine.render(catalog))["models"]
    assert set(models) == set(catalog.entries)
    for mid in (SEMI, HASH, SPACE, NEWLINE):
        argv = shlex.split(models[mid]["cmd"])
        assert argv[argv.index("--model") + 1] == catalog.entries[mid].path
    assert models["ms/injector"]["aliases"] == ["x\n[injected]\nmodel = /etc/passwd"]
    assert models["ms/comma"]["aliases"] == ["a,b", " edge "]
    argv = shlex.split(models["ms/two-values"]["cmd"])
    assert argv[argv.index("--control-vector-layer-range") + 1:][:2] == ["1", "2"]
    argv = shlex.split(models["ms/hashed-value"]["cmd"])
    assert argv[argv.index("--chat-template-kwargs") + 1] == '{"tag": "#1"}'
    argv = shlex.split(models["ms/newline-value"]["cmd"])  # a line break it can hold
    assert argv[argv.index("--chat-template-kwargs") + 1] == '{"a":\n1.50}'
    argv = shlex.split(models["ms/samplers"]["cmd"])
    assert argv[argv.index("--samplers") + 1] == "top_k;Min-P;;temp"

    odd = Catalog(entries={PLAIN: catalog.entries[PLAIN]})
    odd.entries[PLAIN].aliases = ["${env.HOME}", "kept"]
    template, grammar = "a\n  # b", "a \\\nb"
    odd.entries[PLAIN].options = [["--chat-template", template], ["--temp", "0.3"],
                                  ["--grammar", grammar]]
    assert engine.refusals(odd) == {}
    assert engine.left_out(odd) == {PLAIN: [
        f"--chat-template {template!r}: it contains a line that starts with '#', which "
        "llama-swap's config cannot hold; change it in custom_models.yaml",
        f"--grammar {grammar!r}: it contains a line that ends with '\\', which llama-swap's "
        "config cannot hold; change it in custom_models.yaml"]}
    model = yaml.safe_load(engine.render(odd))["models"][PLAIN]
    assert model["aliases"] == ["kept"]  # the proxy alone resolves the other
    argv = shlex.split(model["cmd"])
    assert argv[argv.index("--temp") + 1] == "0.3"
    assert "--chat-template" not in argv and "--grammar" not in argv


def test_catalog_json_keeps_the_options_and_reads_old_files(awkward) -> None:
    catalog = catalog_mod.build(awkward)
    again = Catalog.from_json(catalog.to_json())
    assert again.entries == catalog.entries
    assert again.entries[PLAIN].args == ["--temp", "0.7", "--top-k", "40", "--jinja",
                                         "-ot", "blk.*=CPU", "--cache-ram", "4",
                                         "--slot-save-path", str(awkward.context_cache_dir)]
    old = ('{"entries": [{"id": "ms/x", "path": "/x.gguf", "args": ["--temp", "0.3"], '
           '"cmd": null}]}')
    assert Catalog.from_json(old).entries["ms/x"].options == []


def test_model_show_prints_the_options(awkward, tmp_path) -> None:
    env = {**os.environ, "MODELS_DIR": str(awkward.models_dir),
           "STATE_DIR": str(awkward.state_dir), "CONFIG_DIR": str(awkward.config_dir),
           "MODEL_SERVE_ENV_FILE": str(tmp_path / "none"), "ENGINE": "router",
           "LLAMA_SWAP_PORT": str(free_port())}
    rebuild(awkward, Router(awkward))
    shown = subprocess.run([sys.executable, "-m", "services.cli", "show", PLAIN], env=env,
                           capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).resolve().parent.parent)
    assert shown.returncode == 0, shown.stderr
    assert "--temp 0.7 --top-k 40 --jinja -ot 'blk.*=CPU'" in shown.stdout
    assert "temp = 0.7" in shown.stdout  # the preset it would get, the engine not running
