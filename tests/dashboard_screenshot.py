"""The README's dashboard screenshot, from a real stack on generated models:
`python -m tests.dashboard_screenshot [PATH]`."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from shared.settings import ROOT
from shared.tiny_gguf import write_model
from tests.browser import Chromium
from tests.harness import http, make_stack, wait
from tests.streams import chat

OUT = ROOT / "services" / "proxy" / "dashboard" / "screenshot.png"
MODELS = {"writer": (768, 8), "coder": (512, 8), "helper": (256, 4)}


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (width, layers) in MODELS.items():
            write_model(root / "models" / "pub" / f"{name}-GGUF" / f"{name}-F32.gguf",
                        name=name, n_embd=width, n_layer=layers)
        (root / "config").mkdir()
        stack = make_stack(root, root / "models", root / "config", MODEL_TTL="900")
        try:
            stack.start("engine", "proxy", "governor")
            wait(lambda: http("GET", stack.url + "/running")[1]["system"]["governor"] == "up")
            ids = [m["id"] for m in http("GET", stack.url + "/v1/models")[1]["data"]]
            writer, coder, helper = (next(i for i in ids if name in i) for name in MODELS)
            for model in (helper, writer, coder):
                assert http("POST", stack.url + "/v1/chat/completions", chat(model))[0] == 200
            assert http("POST", stack.url + "/models/unload", {"model": helper})[0] == 200
            assert http("POST", stack.url + "/v1/chat/completions", chat(coder))[0] == 200

            async def shoot() -> None:
                async with Chromium(1200, 640) as browser:
                    page = await browser.open(stack.url + "/")
                    await page.until(f"document.querySelector('tr[data-model=\"{helper}\"]')"
                                     "?.dataset.state === 'unloaded'")
                    await page.until("document.querySelectorAll('#events li').length >= 7")
                    await asyncio.sleep(3)  # a refresh or two: idle times move
                    await page.screenshot(out)

            asyncio.run(shoot())
        finally:
            stack.stop()
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
