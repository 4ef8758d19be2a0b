"""Aliases, sampler values and file paths an engine's config cannot hold as written (`;`,
`#`, `,`, line breaks, blanks at the edges): the model is served all the same, through the
real stack. The router's presets get another spelling of the value, or a link to the file;
what no spelling can hold is left out alone and named in the sync's notices.

The llama-swap case runs the real llama-swap (tests/real_engines.py finds it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared.engines.base import section_name
from shared.tiny_gguf import write_model
from tests.harness import http
from tests.real_engines import llama_swap_bin_dir
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"
ALIASES = ["cut;here", "tag#1", "a,b", "two\nlines", " edge ", "tab\tend\t"]
SAMPLERS = ["top_k", "min_p", "temperature"]
CONFIG = r"""
models:
  tiny:0.2m-f32:
    aliases: ["cut;here", "tag#1", "a,b", "two\nlines", " edge ", "tab\tend\t"]
    sampler_args: "--samplers 'top_k;min_p;temperature' --chat-template-kwargs '{\"t\": \"#1;\"}'"
  creative:
    base_model: tiny:0.2m-f32
    sampler_args: "--chat-template 'x\n#y' --temp 1.5"
"""


@pytest.fixture(params=["router", "llama-swap"])
def stack(request, stack_factory, models_dir: Path, config_dir: Path, tmp_path: Path):
    write_model(models_dir / "pub" / "odd#;dir" / "se;mi#ha-F32.gguf", name="odd", seed=4)
    (config_dir / "custom_models.yaml").write_text(CONFIG)
    if request.param == "router":
        return stack_factory().start()
    path = f"{llama_swap_bin_dir(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    return stack_factory(ENGINE="llama-swap", PATH=path).start()


def answer(stack, model: str) -> dict:
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(model, verbose=True))
    assert status == 200, (model, body)
    assert body["model"] == model  # the name the client asked for
    return body["__verbose"]["generation_settings"]


def test_every_alias_reaches_its_model(stack) -> None:
    models = {m["id"]: m for m in http("GET", stack.url + "/v1/models")[1]["data"]}
    assert models[TINY]["aliases"] == ALIASES
    for name in [TINY, *ALIASES]:
        answer(stack, name)


def test_sampler_values_reach_the_model_and_only_what_cannot_is_left_out(stack) -> None:
    assert answer(stack, "tag#1")["samplers"] == SAMPLERS
    assert answer(stack, "ms/creative")["temperature"] == pytest.approx(1.5)
    synced = stack.cli("sync")
    assert synced.returncode == 0, synced.stderr
    notices = [line for line in synced.stderr.splitlines() if "serves it without" in line]
    assert len(notices) == 1 and "ms/creative: " in notices[0], synced.stderr
    assert "--chat-template 'x\\n#y'" in notices[0]  # its template, named
    assert "not served" not in synced.stderr


def test_a_file_whose_path_holds_hash_and_semicolon_is_served(stack) -> None:
    ids = {m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]}
    odd = next(mid for mid in ids if mid.startswith("ms/se-mi-ha"))
    assert ids == {TINY, "ms/other:0.2m-f32", "ms/creative", odd}
    answer(stack, odd)


def test_the_router_gets_json_and_sampler_orders_in_a_spelling_its_presets_hold(
        stack) -> None:
    if "llama-swap" in http("GET", stack.url + "/health")[1]["engine"]["name"]:
        pytest.skip("llama-swap runs the command as written")
    answer(stack, TINY)
    _, listed = http("GET", stack.engine_url + "/models", headers=stack.engine_headers)
    args = next(m for m in listed["data"] if m["id"] == section_name(TINY))["status"]["args"]
    assert args[args.index("--sampling-seq") + 1] == "kmt"
    assert json.loads(args[args.index("--chat-template-kwargs") + 1]) == {"t": "#1;"}
