from __future__ import annotations

from pathlib import Path

import pytest

from shared.tiny_gguf import write_model
from tests import real_engines
from tests.harness import Stack, make_stack, start_ollama
from tests.real_ollama import RealOllama

pytest_plugins = ["tests.governed"]


def pytest_terminal_summary(terminalreporter) -> None:
    """The real engines this run used, at its end: `make test` runs with -q, which hides the
    header."""
    terminalreporter.write_line(real_engines.which())


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """LM Studio's layout with one model, and the bridge's layout with another."""
    root = tmp_path / "models"
    write_model(root / "pub" / "tiny-GGUF" / "tiny-F32.gguf", name="tiny")
    write_model(root / "ollama" / "other" / "other-0.2m-f32.gguf", name="other", seed=1)
    return root


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.mkdir()
    return path


@pytest.fixture
def stack_factory(tmp_path: Path, models_dir: Path, config_dir: Path):
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stack = make_stack(tmp_path, models_dir, config_dir, **env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def ollama(tmp_path: Path):
    """(url, store) of a running Ollama stand-in with a real on-disk store."""
    url, store, proc = start_ollama(tmp_path)
    yield url, store
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def real_ollama(tmp_path_factory):
    """The real Ollama, one per test module, with a store of its own (the test skips where
    there is none)."""
    ollama = RealOllama.start(tmp_path_factory.mktemp("real-ollama"))
    yield ollama
    ollama.stop()
