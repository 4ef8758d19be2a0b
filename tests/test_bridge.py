"""The bridge on a real on-disk Ollama store and a real models folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_studio_ollama_bridge import Bridge, LinkRecord, read_store
from tests.ollama_store import add_model


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "ollama", tmp_path / "models", tmp_path / "state" / "bridge-links.json"


def sync(dirs, dry_run: bool = False):
    store, models_dir, record = dirs
    models, notices = read_store(store)
    return Bridge(models_dir, record).sync(models, dry_run), notices


def test_reads_every_registry_and_names_them_as_pulled(dirs) -> None:
    store = dirs[0]
    add_model(store, "gemma3:12b")
    add_model(store, "someone/tool:q4", seed=1)
    add_model(store, "hf.co/user/Repo-GGUF:Q8_0", seed=2)
    models, notices = read_store(store)
    assert sorted(m.name for m in models) == [
        "gemma3:12b", "hf.co/user/Repo-GGUF:Q8_0", "someone/tool:q4"]
    assert notices == []


def test_links_models_and_projectors_in_lm_studio_layout(dirs) -> None:
    store, models_dir, _ = dirs
    digest = add_model(store, "gemma3:12b", projector=True, params="12.2B", quant="Q4_K_M")
    report, _ = sync(dirs)
    link = models_dir / "ollama" / "gemma3" / "gemma3-12.2B-Q4_K_M.gguf"
    assert link.is_symlink() and os.readlink(link) == str(store / "blobs" /
                                                            digest.replace(":", "-"))
    proj = models_dir / "ollama" / "gemma3" / "mmproj-gemma3-12.2B-Q4_K_M.gguf"
    assert proj.is_symlink() and proj.resolve().is_file()
    assert sorted(report.created) == sorted([str(link), str(proj)])
    again, _ = sync(dirs)
    assert not again.changed and sorted(again.kept) == sorted(report.created)


def test_same_blob_two_tags_one_link_different_blobs_distinct_names(dirs) -> None:
    store, models_dir, record = dirs
    add_model(store, "gemma3:latest", seed=1)
    add_model(store, "gemma3:12b", seed=1)  # the same blob under two tags
    add_model(store, "gemma3:12b-v2", seed=2)  # same size and quant, another blob
    add_model(store, "hf.co/other/gemma3:latest", seed=3)  # another publisher
    sync(dirs)
    files = sorted(p.name for p in (models_dir / "ollama" / "gemma3").iterdir())
    assert len(files) == 3 and len({os.readlink(models_dir / "ollama/gemma3" / f)
                                    for f in files}) == 3
    names = LinkRecord.load(record).names_by_path()
    plain = str(models_dir / "ollama/gemma3/gemma3-164.54K-F32.gguf")
    assert {"gemma3:latest", "gemma3", "gemma3:12b"} <= set(names[plain])


def test_repull_relinks_removal_unlinks_and_only_our_links_are_touched(dirs) -> None:
    store, models_dir, _ = dirs
    add_model(store, "tiny:1b", seed=1)
    add_model(store, "gone:1b", seed=2)
    sync(dirs)
    link = models_dir / "ollama/tiny/tiny-164.54K-F32.gguf"
    first = os.readlink(link)
    # the user's own things: a file in our folder, a link and a file where we link next
    mine = models_dir / "ollama" / "tiny" / "my-notes.gguf"
    mine.write_text("mine")
    (models_dir / "ollama" / "new").mkdir(parents=True)
    theirs = models_dir / "ollama/new/new-164.54K-F32.gguf"
    theirs.write_text("a file the user put here")

    add_model(store, "tiny:1b", seed=9)  # re-pull: new blob
    (store / "manifests/registry.ollama.ai/library/gone/1b").unlink()
    add_model(store, "new:1b", seed=3)
    report, _ = sync(dirs)
    assert os.readlink(link) != first and report.replaced == [str(link)]
    assert report.removed == [str(models_dir / "ollama/gone/gone-164.54K-F32.gguf")]
    assert not (models_dir / "ollama" / "gone").exists()  # the folder it made, now empty
    assert theirs.read_text() == "a file the user put here"
    assert any("was not made by the bridge" in n for n in report.notices)
    assert mine.read_text() == "mine"

    os.unlink(link)  # the user replaces our link with a file of their own
    link.write_text("replaced by the user")
    (store / "manifests/registry.ollama.ai/library/tiny/1b").unlink()
    sync(dirs)
    assert link.read_text() == "replaced by the user"


def test_non_gguf_and_broken_manifests_are_skipped_with_a_notice(dirs) -> None:
    store, models_dir, _ = dirs
    add_model(store, "mlx-thing:latest", data=b'{"__metadata__": {}}')
    bad = store / "manifests/registry.ollama.ai/library/broken/latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    add_model(store, "ok:1b")
    report, notices = sync(dirs)
    assert len(report.created) == 1
    assert any("mlx-thing:latest" in n and "not GGUF" in n for n in notices)
    assert any("broken:latest" in n and "unreadable manifest" in n for n in notices)


def test_dry_run_prints_and_changes_nothing(dirs) -> None:
    store, models_dir, record = dirs
    add_model(store, "tiny:1b")
    env = {**os.environ, "OLLAMA_MODELS": str(store), "MODELS_DIR": str(models_dir)}
    out = subprocess.run([sys.executable, "-m", "lm_studio_ollama_bridge", "--dry-run",
                          "--record", str(record)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "would link" in out.stdout and "(dry run)" in out.stdout
    assert not models_dir.exists() and not record.exists()
    out = subprocess.run([sys.executable, "-m", "lm_studio_ollama_bridge",
                          "--record", str(record)], env=env, capture_output=True, text=True)
    assert "1 linked" in out.stdout and (models_dir / "ollama/tiny").is_dir()


def test_model_sync_dry_run_uses_the_stacks_settings(stack_factory, tmp_path) -> None:
    """`model sync --dry-run` reads .env like every `model` command, and changes nothing."""
    store = tmp_path / "store"
    add_model(store, "tiny:1b")
    stack = stack_factory(OLLAMA_MODELS=str(store))
    before = sorted(p.name for p in Path(stack.env["MODELS_DIR"]).rglob("*"))
    out = stack.cli("sync", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"Ollama's store {store} → {stack.env['MODELS_DIR']}" in out.stdout
    assert "would link" in out.stdout and "1 to link" in out.stdout, out.stdout
    assert sorted(p.name for p in Path(stack.env["MODELS_DIR"]).rglob("*")) == before
