import os
import time
from pathlib import Path

import pytest

from shared import catalog as catalog_mod
from shared.engines import make_engine
from shared.gguf_header import GGUFError, read_header
from shared.settings import load
from shared.sync import rebuild
from shared.tiny_gguf import write_model


def settings_for(tmp_path: Path, models: Path, config: Path, **env: str):
    return load({"MODELS_DIR": str(models), "STATE_DIR": str(tmp_path / "state"),
                 "CONFIG_DIR": str(config), **env}, env_file=tmp_path / "none")


def test_header_gives_architecture_size_and_quantisation(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", name="m", n_embd=64, n_layer=3)
    info = read_header(path)
    assert (info.architecture, info.file_type, info.block_count) == ("llama", "f32", 3)
    assert (info.head_count, info.head_count_kv, info.key_length) == (4, 4, 16)
    assert info.context_length == 4096
    assert info.param_count == 2 * 259 * 64 + 64 + 3 * (2 * 64 + 4 * 64 * 64 + 3 * 64 * 256)


def test_header_rejects_files_that_are_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a model at all")
    with pytest.raises(GGUFError):
        read_header(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGUFError, match="truncated"):
        read_header(tmp_path / "t.gguf")


def test_discovers_both_layouts_with_readable_ids(tmp_path, models_dir, config_dir) -> None:
    cat = catalog_mod.build(settings_for(tmp_path, models_dir, config_dir))
    assert sorted(cat.entries) == ["ms/other:0.2m-f32", "ms/tiny:0.2m-f32"]
    tiny = cat.entries["ms/tiny:0.2m-f32"]
    assert tiny.ctx_size == 4096  # DEFAULT_CTX_SIZE 8192, capped at the trained context
    assert tiny.ttl == 1800 and tiny.parallel == 1 and tiny.backend == "engine"


def test_symlinks_projectors_shards_and_junk(tmp_path, config_dir) -> None:
    root = tmp_path / "models"
    blob = write_model(tmp_path / "blobs" / "sha256-abc", name="linked")
    (root / "ollama" / "linked").mkdir(parents=True)
    os.symlink(blob, root / "ollama" / "linked" / "linked-0.2m-f32.gguf")
    write_model(root / "pub" / "vis" / "vis-F32.gguf", name="vis")
    write_model(root / "pub" / "vis" / "mmproj-vis-F16.gguf", name="proj")
    write_model(root / "pub" / "big" / "big-F32-00001-of-00002.gguf", name="big")
    write_model(root / "pub" / "big" / "big-F32-00002-of-00002.gguf", name="big", seed=2)
    (root / "pub" / "junk").mkdir()
    (root / "pub" / "junk" / "notes.gguf").write_text("hello")
    os.symlink(tmp_path / "missing", root / "pub" / "junk" / "gone.gguf")

    cat = catalog_mod.build(settings_for(tmp_path, root, config_dir))
    assert sorted(cat.entries) == ["ms/big:0.2m-f32", "ms/linked:0.2m-f32", "ms/vis:0.2m-f32"]
    linked = cat.entries["ms/linked:0.2m-f32"]
    assert linked.path == str(root / "ollama/linked/linked-0.2m-f32.gguf")  # the link itself
    assert cat.entries["ms/vis:0.2m-f32"].mmproj.endswith("mmproj-vis-F16.gguf")
    big = cat.entries["ms/big:0.2m-f32"]
    assert big.path.endswith("00001-of-00002.gguf")
    assert big.size_bytes == sum(p.stat().st_size for p in (root / "pub/big").iterdir())
    assert any("notes.gguf: not a GGUF file" in n for n in cat.notices)
    assert any("gone.gguf: broken link" in n for n in cat.notices)


def test_ids_stay_unique_when_two_files_would_share_one(tmp_path, config_dir) -> None:
    root = tmp_path / "models"
    write_model(root / "a" / "tiny" / "tiny-F32.gguf", name="tiny")
    write_model(root / "b" / "tiny" / "tiny-F32.gguf", name="tiny", seed=3)
    cat = catalog_mod.build(settings_for(tmp_path, root, config_dir))
    ids = sorted(cat.entries)
    assert len(ids) == 2 and ids[0] == "ms/tiny:0.2m-f32" and ids[1].startswith(ids[0] + "-")
    assert cat.entries[ids[0]].path.startswith(str(root / "a"))
    again = catalog_mod.build(settings_for(tmp_path, root, config_dir))
    assert sorted(again.entries) == ids


def test_rescan_of_hundreds_of_models_is_fast_from_the_cache(tmp_path, config_dir) -> None:
    root = tmp_path / "models"
    one = write_model(tmp_path / "one.gguf")
    for i in range(300):
        (root / "pub" / f"m{i}").mkdir(parents=True)
        os.link(one, root / "pub" / f"m{i}" / f"m{i}-F32.gguf")
    settings = settings_for(tmp_path, root, config_dir)
    assert len(catalog_mod.build(settings).entries) == 300
    cache = (tmp_path / "state" / "gguf-cache.json")
    before = cache.stat().st_mtime_ns
    start = time.perf_counter()
    assert len(catalog_mod.build(settings).entries) == 300
    print(f"rescan of 300 cached models: {time.perf_counter() - start:.3f}s")
    assert cache.stat().st_mtime_ns == before  # every header came from the cache


def test_custom_settings_and_aliases(tmp_path, models_dir, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text("""
models:
  tiny-0.2m-f32:            # the original tool's colon-free spelling
    sampler_args: "--temp 0.3 --top-nsigma 1.5 --min-p 0.05"
    ttl: 60
    pin: true
  ms/other:0.2m-f32:
    ctx_size: 1024
    parallel: 2
    aliases: [other:latest]
  creative:
    base_model: tiny:0.2m-f32
    sampler_args: "--temp 1.5"
    ctx_size: 512
""")
    settings = settings_for(tmp_path, models_dir, config_dir)
    cat = catalog_mod.build(settings)
    tiny = cat.entries["ms/tiny:0.2m-f32"]
    # its prompt cache: twice its KV cache (512 bytes a token, 4096 tokens) in MiB; and where
    # its slots are saved before it leaves
    saves = ["--slot-save-path", str(settings.context_cache_dir)]
    assert tiny.args == ["--temp", "0.3", "--top-nsigma", "1.5", "--min-p", "0.05",
                         "--cache-ram", "4", *saves]
    assert (tiny.ttl, tiny.pin) == (60, True)
    other = cat.entries["ms/other:0.2m-f32"]
    assert (other.ctx_size, other.parallel) == (1024, 2)
    assert cat.resolve("other:latest") is other
    creative = cat.entries["ms/creative"]
    assert creative.path == tiny.path and creative.base_model == tiny.id
    assert creative.args == ["--temp", "1.5", "--cache-ram", "1", *saves]
    assert creative.ctx_size == 512
    assert cat.resolve("ms/creative") is creative
    assert cat.resolve("ms/tiny-0.2m-f32") is tiny


@pytest.mark.parametrize(("yaml_text", "words"), [
    ("models:\n  tiny:0.2m-f32:\n    temprature: 1\n", ["models.tiny:0.2m-f32.temprature",
                                                         "unknown key"]),
    ("models:\n  tiny:0.2m-f32:\n    ctx_sise: 10\n", ["unknown key (did you mean ctx_size?"]),
    ("models:\n  tiny:0.2m-f32:\n    ttl: soon\n", ["models.tiny:0.2m-f32.ttl", "whole number"]),
    ("models:\n  tiny:0.2m-f32:\n    pin: 1\n", ["models.tiny:0.2m-f32.pin", "true or false"]),
    ("models:\n  tiny:0.2m-f32:\n    backend: vllm\n", ["backend", "engine, ollama"]),
    ("models:\n  fast:\n    base_model: tiyn:0.2m-f32\n",
     ["models.fast.base_model", "no model named 'tiyn:0.2m-f32'", "ms/tiny:0.2m-f32"]),
    ("models: [1, 2\n", ["not valid YAML"]),
])
def test_config_errors_name_file_model_key_and_reason(tmp_path, models_dir, config_dir,
                                                      yaml_text, words) -> None:
    path = config_dir / "custom_models.yaml"
    path.write_text(yaml_text)
    cat = catalog_mod.build(settings_for(tmp_path, models_dir, config_dir))
    assert sorted(cat.entries) == ["ms/other:0.2m-f32", "ms/tiny:0.2m-f32"]  # still served
    [notice] = cat.notices
    assert str(path) in notice
    for word in words:
        assert word in notice


def test_a_bad_entry_is_left_out_and_the_others_apply(tmp_path, models_dir, config_dir) -> None:
    settings = settings_for(tmp_path, models_dir, config_dir)
    engine = make_engine(settings)
    path = config_dir / "custom_models.yaml"
    path.write_text("models:\n  tiny:0.2m-f32:\n    ttl: 60\n")
    assert rebuild(settings, engine).catalog.entries["ms/tiny:0.2m-f32"].ttl == 60

    bad = "models:\n  tiny:0.2m-f32:\n    ttl: -5\n  other:0.2m-f32:\n    ttl: 70\n"
    path.write_text(bad)
    result = rebuild(settings, engine)
    assert result.catalog.entries["ms/tiny:0.2m-f32"].ttl == 1800  # its defaults
    assert result.catalog.entries["ms/other:0.2m-f32"].ttl == 70
    assert result.catalog.notices == [
        f"{path}: models.tiny:0.2m-f32.ttl: must be 0 or more seconds, got -5; entry ignored"]
    assert path.read_text() == bad  # never touched


def test_with_no_models_a_demo_model_is_served(tmp_path, config_dir) -> None:
    settings = settings_for(tmp_path, tmp_path / "empty", config_dir)
    result = rebuild(settings, make_engine(settings))
    assert list(result.catalog.entries) == ["ms/demo:0.2m-f32"]
    assert not (tmp_path / "empty").exists()  # nothing written into the user's folder


def test_harmony_models_by_architecture_list_and_setting(tmp_path, models_dir,
                                                         config_dir) -> None:
    import gguf
    import numpy as np

    path = models_dir / "pub" / "oss" / "gpt-oss-20b-F32.gguf"
    path.parent.mkdir(parents=True)
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (config_dir / "harmony_models.yaml").write_text("harmony_models:\n- other:0.2m-f32\n- gone\n")
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    harmony: native\n    reasoning_effort: high\n")
    cat = catalog_mod.build(settings_for(tmp_path, models_dir, config_dir))
    assert cat.entries["ms/gpt-oss-20b:0.0m-f32"].harmony == "proxy"
    assert cat.entries["ms/other:0.2m-f32"].harmony == "proxy"
    tiny = cat.entries["ms/tiny:0.2m-f32"]
    assert (tiny.harmony, tiny.reasoning_effort) == ("native", "high")
    assert any("harmony_models.yaml: gone: no such model" in n for n in cat.notices)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    harmony: yes-please\n")
    cat = catalog_mod.build(settings_for(tmp_path, models_dir, config_dir))
    assert cat.entries["ms/tiny:0.2m-f32"].harmony == "off"
    assert any("models.tiny:0.2m-f32.harmony: expected one of" in n for n in cat.notices)
