"""A sync fails per entry, never per stack: whatever a file it reads holds, every other model
is still served and the problem is named once. Ids stay put; one sync writes at a time."""

import json
import math
import os
import shutil
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGUFValueType as T

from lm_studio_ollama_bridge import Bridge, LinkRecord, read_store
from shared.catalog import Catalog
from shared.engines import make_engine
from shared.metadata_cache import VERSION
from shared.model_files import discover
from shared.sync import rebuild, sync_all
from shared.tiny_gguf import write_model
from tests.harness import http
from tests.ollama_store import add_model
from tests.streams import chat
from tests.test_catalog import settings_for

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"


def first_sync(tmp_path: Path, models_dir: Path, config_dir: Path, **env: str) -> Catalog:
    """A sync on a first start: no last good catalog to fall back on."""
    settings = settings_for(tmp_path, models_dir, config_dir, **env)
    result = rebuild(settings, make_engine(settings))
    assert Catalog.from_json(settings.catalog_file.read_text()).entries.keys() == \
        result.catalog.entries.keys()
    return result.catalog


# custom_models.yaml


@pytest.mark.parametrize(("raw", "reason"), [
    (b"models:\n  tiny:0.2m-f32:\n    ttl: 60\n  caf\xe9:\n    ttl: 1\n",
     "line 4: not UTF-8 text (byte 0xe9); save it as UTF-8"),
    (b"[" * 20000, "nested too deeply"),
    (b"models:\n  tiny:0.2m-f32: [ttl: 60\n", "not valid YAML"),
    (b"models:\n  tiny:0.2m-f32:\n    ttl: !!bool 7\n", "not valid YAML"),
    (b"models:\n  tiny:0.2m-f32:\n    ttl: 2001-13-45\n", "month must be in 1..12"),
    (b"- tiny:0.2m-f32\n- other:0.2m-f32\n", "expected a top-level 'models:' mapping"),
    (b"just some words\n", "expected a top-level 'models:' mapping"),
    (b"models: [tiny, other]\n", "models: expected a mapping"),
    (b"models: 12\n", "models: expected a mapping"),
])
def test_a_file_that_cannot_be_read_gives_one_notice_and_every_model(
        tmp_path, models_dir, config_dir, raw, reason) -> None:
    path = config_dir / "custom_models.yaml"
    path.write_bytes(raw)
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == [OTHER, TINY]
    assert cat.entries[TINY].ttl == 1800  # no custom settings
    [notice] = cat.notices
    assert notice.startswith(f"{path}: ") and reason in notice


def test_utf16_with_its_bom_is_read(tmp_path, models_dir, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_bytes(
        "models:\n  tiny:0.2m-f32:\n    ttl: 60  # café\n".encode("utf-16"))
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert cat.entries[TINY].ttl == 60 and cat.notices == []


def test_each_bad_entry_is_left_out_and_every_other_applies(tmp_path, models_dir,
                                                            config_dir) -> None:
    path = config_dir / "custom_models.yaml"
    path.write_text("""
colour: blue
models:
  tiny:0.2m-f32:
    ctx_size: "abc"
    ttl: 5
  other:0.2m-f32:
    ttl: 70
  1:
    ttl: 5
  listed: [ttl, 5]
  looped:
    base_model: other:0.2m-f32
    chat_template_kwargs: &x {again: *x}
  dated:
    base_model: other:0.2m-f32
    chat_template_kwargs: {when: 2024-01-01}
  typo:
    base_model: other:0.2m-f32
    temprature: 1.5
  fine:
    base_model: tiny:0.2m-f32
    ttl: 9
""")
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == ["ms/fine", OTHER, TINY]
    assert cat.entries[TINY].ttl == 1800 and cat.entries[TINY].ctx_size == 4096
    assert cat.entries[OTHER].ttl == 70 and cat.entries["ms/fine"].ttl == 9
    where = f"{path}: models."
    expected = [
        f"{path}: 'colour': unknown top-level key",
        f"{where}tiny:0.2m-f32.ctx_size: expected a whole number, got 'abc'; entry ignored",
        f"{where}1: a model name must be text; entry ignored",
        f"{where}listed: expected a mapping of settings",
        f"{where}looped: a value that is not plain text",
        f"{where}dated: a value that is not plain text",
        f"{where}typo.temprature: unknown key",
    ]
    assert len(cat.notices) == len(expected)
    for notice, start in zip(cat.notices, expected, strict=True):
        assert notice.startswith(start), notice


def test_a_stale_alias_is_skipped_and_the_removed_model_leaves(tmp_path, models_dir,
                                                               config_dir) -> None:
    path = config_dir / "custom_models.yaml"
    path.write_text("models:\n  fast:\n    base_model: other:0.2m-f32\n"
                    "  tiny:0.2m-f32:\n    ttl: 60\n")
    assert "ms/fast" in first_sync(tmp_path, models_dir, config_dir).entries
    shutil.rmtree(models_dir / "ollama" / "other")  # the user removes the base model

    cat = first_sync(tmp_path, models_dir, config_dir)
    assert list(cat.entries) == [TINY] and cat.entries[TINY].ttl == 60
    assert cat.notices == [f"{path}: models.fast.base_model: no model named 'other:0.2m-f32' "
                           f"(closest: {TINY}); alias ignored"]


def test_entries_that_clash_lose_to_the_one_before_them(tmp_path, models_dir,
                                                        config_dir) -> None:
    path = config_dir / "custom_models.yaml"
    path.write_text("""
models:
  tiny:0.2m-f32:
    aliases: [shared, mine]
  other:0.2m-f32:
    aliases: [shared, theirs, tiny:0.2m-f32]
    backend: ollama
  ms/tiny-0.2m-f32:
    ttl: 5
  creative:
    base_model: tiny:0.2m-f32
  ms/creative:
    base_model: other:0.2m-f32
  other-0.2m-f32:
    base_model: tiny:0.2m-f32
  cloud:
    base_model: tiny:0.2m-f32
    backend: ollama
""")
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == ["ms/creative", OTHER, TINY]
    assert cat.entries["ms/creative"].base_model == TINY
    assert cat.entries[TINY].aliases == ["shared", "mine"]
    assert cat.entries[OTHER].aliases == [] and cat.entries[OTHER].backend == "engine"
    assert cat.resolve("shared").id == TINY and cat.entries[TINY].ttl == 1800
    assert cat.notices == [
        f"{path}: models.other:0.2m-f32.backend: ollama, but Ollama does not have this model "
        f"(pull it with Ollama or set ollama_model); entry ignored, {OTHER} is served with "
        "default settings",
        f"{path}: models.ms/tiny-0.2m-f32: {TINY} already has its settings from "
        "models.tiny:0.2m-f32; entry ignored",
        f"{path}: models.ms/creative: the name is already ms/creative's; alias ignored",
        f"{path}: models.other-0.2m-f32: the name is already {OTHER}'s; alias ignored",
        f"{path}: models.cloud.backend: ollama, but Ollama does not have this model (pull it "
        "with Ollama or set ollama_model); alias ignored",
    ]

    # a name is every spelling of it: without the prefix, with a dash for the colon
    path.write_text("models:\n  other:0.2m-f32:\n    aliases: [tiny-0.2m-f32, ms/tiny-0.2m-f32]\n")
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert cat.entries[OTHER].aliases == [] and cat.resolve("tiny-0.2m-f32").id == TINY
    assert len(cat.notices) == 2 and "already ms/tiny:0.2m-f32's" in cat.notices[0]

    path.write_text("models:\n  tiny:0.2m-f32:\n    aliases: [shared]\n"
                    "  other:0.2m-f32:\n    aliases: [shared, theirs, tiny:0.2m-f32]\n")
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert cat.entries[OTHER].aliases == ["theirs"]
    assert cat.notices == [
        f"{path}: models.other:0.2m-f32: the name 'shared' is already {TINY}'s; not given "
        f"to {OTHER}",
        f"{path}: models.other:0.2m-f32: the name 'tiny:0.2m-f32' is already {TINY}'s; not "
        f"given to {OTHER}"]


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00oops", b"[" * 20000, b"harmony_models: 3\n",
                                 b"- a list\n"])
def test_a_bad_harmony_list_is_one_notice(tmp_path, models_dir, config_dir, raw) -> None:
    (config_dir / "harmony_models.yaml").write_bytes(raw)
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == [OTHER, TINY]
    [notice] = cat.notices
    assert "harmony_models.yaml: " in notice and notice.endswith("the list is ignored")


# GGUF headers


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value) -> bytes:
    formats = {T.UINT32: "<I", T.INT32: "<i", T.FLOAT32: "<f", T.FLOAT64: "<d"}
    if vtype == T.STRING:
        return _string(value)
    if vtype == T.ARRAY:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(_value(itype, i) for i in items)
    return struct.pack(formats[vtype], value)


def write_header(path: Path, kv: dict[str, tuple[int, object]]) -> Path:
    """A GGUF header with these key/values and no tensors, written byte by byte, so that it
    can hold what a GGUF writer would refuse."""
    body = b"".join(_string(k) + struct.pack("<I", t) + _value(t, v) for k, (t, v) in kv.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + body)
    return path


def nested_array(depth: int) -> bytes:
    """A value of `depth` arrays, each holding the next: as deep as a header likes."""
    return struct.pack("<I", T.ARRAY) + struct.pack("<IQ", T.ARRAY, 1) * depth + \
        struct.pack("<IQ", T.UINT32, 0)


ARCH = {"general.architecture": (T.STRING, "llama")}


@pytest.mark.parametrize(("kv", "key"), [
    ({**ARCH, "llama.context_length": (T.STRING, "4096")}, "llama.context_length"),
    ({**ARCH, "llama.context_length": (T.FLOAT64, math.nan)}, "llama.context_length"),
    ({**ARCH, "llama.context_length": (T.FLOAT32, math.inf)}, "llama.context_length"),
    ({**ARCH, "llama.context_length": (T.INT32, -1)}, "llama.context_length"),
    ({**ARCH, "llama.attention.head_count": (T.ARRAY, (T.STRING, ["8", "8"]))},
     "llama.attention.head_count"),
    ({**ARCH, "llama.block_count": (T.ARRAY, (T.ARRAY, [(T.UINT32, [1])]))},
     "llama.block_count"),
    ({**ARCH, "general.file_type": (T.FLOAT64, math.inf)}, "general.file_type"),
    ({"general.architecture": (T.UINT32, 7)}, "general.architecture"),
])
def test_a_header_with_odd_values_is_skipped_with_a_notice(tmp_path, models_dir, config_dir,
                                                           kv, key) -> None:
    odd = write_header(models_dir / "pub" / "odd" / "odd-F32.gguf", kv)
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == [OTHER, TINY]
    [notice] = cat.notices
    assert notice.startswith(f"{odd}: unreadable GGUF header ({key}: ")


def test_arrays_nested_without_end_and_float_counts(tmp_path, models_dir, config_dir) -> None:
    deep = models_dir / "pub" / "deep" / "deep-F32.gguf"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("llama.block_count")
                     + nested_array(5000))
    write_header(models_dir / "pub" / "round" / "round-F32.gguf",
                 {**ARCH, "llama.context_length": (T.FLOAT64, 2048.0)})
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert cat.entries["ms/round:0.0m-f32"].ctx_size == 2048  # odd but clear: read as it is
    assert cat.notices == [f"{deep}: unreadable GGUF header (arrays nested too deeply), skipped"]


@pytest.mark.parametrize("entry", [
    "not a mapping", {"stamp": "now"}, {"info": {"context_length": "abc"}},
    {"info": {"architecture": ["llama"]}}, {"info": None}])
def test_a_damaged_header_cache_is_read_again(tmp_path, models_dir, config_dir, entry) -> None:
    first_sync(tmp_path, models_dir, config_dir)
    cache = tmp_path / "state" / "gguf-cache.json"
    data = json.loads(cache.read_text())
    assert data["version"] == VERSION
    for key, hit in data["entries"].items():
        damaged = entry if isinstance(entry, str) else {**hit, **entry}
        if isinstance(damaged, dict) and isinstance(damaged.get("info"), dict):
            damaged["info"] = {**hit["info"], **damaged["info"]}
        data["entries"][key] = damaged
    cache.write_text(json.dumps(data))
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == [OTHER, TINY] and cat.notices == []
    assert cat.entries[TINY].ctx_size == 4096


# Ollama's manifests


@pytest.mark.parametrize(("manifest", "reason"), [
    ({"layers": [1, 2]}, "'layers' is not a list of layers"),
    ({"layers": {"a": 1}}, "'layers' is not a list of layers"),
    ({"config": [], "layers": []}, "'config' is not an object"),
    ([1, 2], "not a JSON object"),
    ({"layers": [{"mediaType": "application/vnd.ollama.image.model"}]},
     "the model layer has no usable digest (None)"),
    ({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": 12}]},
     "the model layer has no usable digest (12)"),
    ({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                  "digest": "sha256:../../../etc/passwd"}]}, "no usable digest"),
    ({"config": {"digest": ["x"]}, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:00"}]},
     "'config' has no usable digest"),
    ("[" * 100000, "unreadable manifest"),
])
def test_a_manifest_of_another_shape_is_skipped_and_the_others_served(tmp_path, manifest,
                                                                       reason) -> None:
    store = tmp_path / "ollama"
    add_model(store, "good:1b")
    bad = store / "manifests/registry.ollama.ai/library/bad/1b"
    bad.parent.mkdir(parents=True)
    bad.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    models, notices = read_store(store)
    assert [m.name for m in models] == ["good:1b"]
    [notice] = notices
    assert notice.startswith(f"bad:1b: unreadable manifest {bad} (") and reason in notice
    report = Bridge(tmp_path / "models", tmp_path / "record.json").sync(models)
    assert len(report.created) == 1


# folders and files that come and go


def test_folders_vanishing_mid_scan_do_not_stop_it(tmp_path) -> None:
    root = tmp_path / "models"
    write_model(root / "pub" / "keep" / "keep-F32.gguf")
    one = write_model(tmp_path / "one.gguf")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for i in range(20):
                folder = root / f"p{i}" / "m" / "deeper"
                folder.mkdir(parents=True, exist_ok=True)
                os.link(one, folder / "m-F32.gguf")
            for i in range(20):
                shutil.rmtree(root / f"p{i}", ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(400):
            files, _ = discover(root)
            assert root / "pub/keep/keep-F32.gguf" in [f.path for f in files]
    finally:
        stop.set()
        thread.join()


def test_a_file_name_that_is_not_utf8_is_skipped(tmp_path, models_dir, config_dir) -> None:
    folder = os.fsencode(models_dir / "pub") + b"/caf\xe9"
    os.makedirs(folder)
    shutil.copy(models_dir / "pub/tiny-GGUF/tiny-F32.gguf", folder + b"/caf\xe9-F32.gguf")
    cat = first_sync(tmp_path, models_dir, config_dir)
    assert sorted(cat.entries) == [OTHER, TINY]
    [notice] = cat.notices
    assert notice.endswith("caf\\udce9-F32.gguf': the path is not valid UTF-8, skipped")


# names that stay put


def test_an_id_keeps_pointing_at_its_file(tmp_path, models_dir, config_dir) -> None:
    """An Ollama pull whose id would equal an LM Studio model's takes the suffix; the id
    frees only when its file is gone, and comes back to it when it returns."""
    store = tmp_path / "ollama"
    env = {"OLLAMA_MODELS": str(store)}
    settings = settings_for(tmp_path, models_dir, config_dir, **env)
    engine = make_engine(settings)
    lm_studio = str(models_dir / "pub/tiny-GGUF/tiny-F32.gguf")
    assert sync_all(settings, engine)[1].catalog.entries[TINY].path == lm_studio

    add_model(store, "tiny:latest", seed=7)  # sorts before pub/: took the id until now
    cat = sync_all(settings, engine)[1].catalog
    assert cat.entries[TINY].path == lm_studio
    [pulled] = [e for e in cat.entries.values() if e.ollama == "tiny:latest"]
    assert pulled.id.startswith(TINY + "-")

    moved = tmp_path / "tiny-F32.gguf"
    os.replace(lm_studio, moved)
    assert first_sync(tmp_path, models_dir, config_dir, **env).resolve(pulled.id) is not None
    assert TINY not in first_sync(tmp_path, models_dir, config_dir, **env).entries
    os.replace(moved, lm_studio)  # the same file back: its id is still free
    cat = first_sync(tmp_path, models_dir, config_dir, **env)
    assert cat.entries[TINY].path == lm_studio and pulled.id in cat.entries

    (tmp_path / "state" / "ids.json").write_text('{"ms/x": 5, "ms/y": ["a"]}')  # damaged
    assert len(first_sync(tmp_path, models_dir, config_dir, **env).entries) == 3


# names as users write them


def test_every_spelling_resolves_with_or_without_the_prefix(tmp_path, models_dir,
                                                            config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny-creative:\n    base_model: tiny-0.2m-f32\n")
    cat = first_sync(tmp_path, models_dir, config_dir)
    for name in ("tiny-creative", "ms/tiny-creative"):
        assert cat.resolve(name).id == "ms/tiny-creative"
    for name in (TINY, "ms/tiny-0.2m-f32", "tiny:0.2m-f32", "tiny-0.2m-f32"):
        assert cat.resolve(name).id == TINY
    assert cat.resolve("tiny") is None
    again = Catalog.from_json((tmp_path / "state" / "catalog.json").read_text())
    assert again.resolve("tiny-0.2m-f32").id == TINY  # the proxy's and governor's copy
    old = json.loads(cat.to_json())
    del old["prefix"]  # a catalog.json written before the prefix was stored
    assert Catalog.from_json(json.dumps(old)).resolve(TINY).id == TINY


def test_the_proxy_answers_names_without_the_prefix(stack_factory, models_dir,
                                                    config_dir) -> None:
    for path in sorted(models_dir.rglob("*.gguf")):
        path.unlink()  # only the demo model
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  demo-creative:\n    base_model: demo-0.2m-f32\n")
    stack = stack_factory().start()
    for name in ("demo-0.2m-f32", "demo:0.2m-f32", "demo-creative", "ms/demo-creative"):
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(name))
        assert status == 200, body
        assert body["model"] == name


# one writer


def test_two_syncs_at_once_lose_nothing(tmp_path, models_dir, config_dir) -> None:
    store = tmp_path / "ollama"
    settings = settings_for(tmp_path, models_dir, config_dir, OLLAMA_MODELS=str(store))
    engine = make_engine(settings)
    names = [f"m{i}:1b" for i in range(12)]
    for i, name in enumerate(names):
        add_model(store, name, seed=i)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sync_all(settings, engine)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread below
            errors.append(e)

    for round_ in range(8):
        if round_ % 2:  # `ollama rm` of half of them, then pulled again
            for name in names[::2]:
                model, tag = name.split(":")
                (store / "manifests/registry.ollama.ai/library" / model / tag).unlink()
        else:
            for i, name in enumerate(names[::2]):
                add_model(store, name, seed=2 * i)
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        record = LinkRecord.load(settings.bridge_record)
        links = {str(p) for p in (models_dir / "ollama").rglob("*.gguf") if p.is_symlink()}
        assert set(record.links) == links  # every link on record, and nothing else
        pulled = len(names) // 2 if round_ % 2 else len(names)
        assert len(links) == pulled
        catalog = Catalog.from_json(settings.catalog_file.read_text())
        assert len(catalog.entries) == pulled + 2


def test_a_sync_cut_short_still_records_the_links_it_made(tmp_path) -> None:
    """So that after `ollama rm` the next sync removes the link instead of leaving it."""
    store, models_dir, record = tmp_path / "ollama", tmp_path / "models", tmp_path / "r.json"
    add_model(store, "aaa:1b", seed=1)
    add_model(store, "zzz:1b", seed=2)
    models, _ = read_store(store)
    cut = [models[0], replace(models[1], blob=Path("no\0such"))]  # the second link fails
    with pytest.raises(ValueError, match="null"):
        Bridge(models_dir, record).sync(cut)
    link = models_dir / "ollama/aaa/aaa-164.54K-F32.gguf"
    assert link.is_symlink() and str(link) in LinkRecord.load(record).links

    (store / "manifests/registry.ollama.ai/library/aaa/1b").unlink()  # ollama rm aaa:1b
    report = Bridge(models_dir, record).sync(read_store(store)[0])
    assert report.removed == [str(link)] and not link.is_symlink()
    assert not (models_dir / "ollama" / "aaa").exists()
