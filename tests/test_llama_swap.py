"""The llama-swap adapter against the stand-in (llama-swap cannot be installed here), which
runs real llama-server processes."""

import asyncio
import os
import time

import aiohttp
import pytest

from shared import settings as settings_mod
from shared.catalog import Catalog
from shared.engines.llama_swap import LlamaSwap
from tests.harness import http, swap_bin_dir
from tests.streams import chat, stream_chat

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"


@pytest.fixture
def stack(stack_factory, config_dir, tmp_path):
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    sampler_args: --temp 0.3\n    aliases: [tiny:latest]\n")
    path = f"{swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    return stack_factory(ENGINE="auto", PATH=path).start()


def states(stack) -> dict[str, str]:
    return {m["id"]: m["status"] for m in http("GET", stack.url + "/v1/models")[1]["data"]}


def test_models_load_side_by_side_and_unload_one_at_a_time(stack) -> None:
    assert http("GET", stack.url + "/health")[1]["engine"]["name"] == "llama-swap"
    for model in (TINY, OTHER, "tiny:latest"):
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(model))
        assert status == 200 and body["model"] == model, body
    events = stream_chat(stack.url, OTHER, 8, ignore_eos=True)
    assert {e["model"] for e in events} == {OTHER}
    assert states(stack) == {TINY: "loaded", OTHER: "loaded"}

    async def unload() -> None:
        settings = settings_mod.load(stack.env)
        engine = LlamaSwap(settings)
        catalog = Catalog.from_json(settings.catalog_file.read_text())
        async with aiohttp.ClientSession() as session:
            await engine.unload(session, catalog.entries[TINY])
            assert await engine.loaded(session, catalog) == {OTHER: "loaded"}
            await engine.load(session, catalog.entries[TINY])
            assert set(await engine.loaded(session, catalog)) == {TINY, OTHER}

    asyncio.run(unload())


def test_config_changes_reach_llama_swap_through_its_watch(stack, config_dir) -> None:
    body = http("POST", stack.url + "/v1/chat/completions", chat(TINY, verbose=True))[1]
    assert body["__verbose"]["generation_settings"]["temperature"] == pytest.approx(0.3)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  tiny:0.2m-f32:\n    sampler_args: --temp 0.8\n")
    result = stack.cli("sync")
    assert result.returncode == 0 and "updated" in result.stdout, result.stderr
    temperature = None
    for _ in range(50):  # llama-swap restarts the model when it sees the new file
        status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY, verbose=True))
        if status == 200:
            temperature = body["__verbose"]["generation_settings"]["temperature"]
            if temperature == pytest.approx(0.8):
                break
        time.sleep(0.1)
    assert temperature == pytest.approx(0.8)
