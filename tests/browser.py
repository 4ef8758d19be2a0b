"""Headless Chromium driven over the DevTools protocol (a websocket, with aiohttp): enough to
open a page, read and click it, and take a screenshot, with no browser-automation package."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from tests.harness import end

# the names the Makefile's `browser` target looks for, in the same order
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAC_APPS = ("/Applications/Chromium.app/Contents/MacOS/Chromium",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")


def find_chromium() -> str:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in NAMES:
        if found := shutil.which(name):
            return found
    for app in MAC_APPS:
        if os.access(app, os.X_OK):
            return app
    raise RuntimeError("no Chromium found (chromium, google-chrome, or CHROMIUM=<path>); "
                       "`make test` installs Debian's chromium or Homebrew's")


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self._next = ws, 0

    async def send(self, method: str, **params) -> dict:
        self._next += 1
        ask = self._next
        await self.ws.send_json({"id": ask, "method": method, "params": params})
        async for msg in self.ws:  # events (Page.loadEventFired, ...) are not waited on
            data = json.loads(msg.data)
            if data.get("id") == ask:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError("the browser closed its connection")

    async def js(self, expression: str):
        """The expression's value (awaited if it is a promise); a thrown error raises."""
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 30):
        """Polls the page until the expression is truthy; its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (value := await self.js(expression)) in (None, False, "", 0, []):
            if loop.time() > deadline:
                raise AssertionError(f"the page never showed: {expression}")
            await asyncio.sleep(0.2)
        return value

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


class Chromium:
    """`async with Chromium() as browser: page = await browser.open(url)`"""

    def __init__(self, width: int = 1280, height: int = 860, *args: str) -> None:
        self.size, self.args = f"{width},{height}", args

    async def __aenter__(self) -> Chromium:
        # its helper processes may still write the profile as the browser ends
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        # --no-sandbox: the sandbox needs user namespaces that containers (and root) lack;
        # this browser opens only the test's own local page
        self.proc = subprocess.Popen(
            [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile.name}", f"--window-size={self.size}",
             *self.args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and len(port_file.read_text().split()) >= 2:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("chromium did not open its DevTools port")
        self.port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        return self

    async def open(self, url: str) -> Page:
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
            target = next(t for t in await resp.json() if t["type"] == "page")
        page = Page(await self.session.ws_connect(target["webSocketDebuggerUrl"],
                                                  max_msg_size=0))
        await page.send("Page.enable")
        await page.send("Page.navigate", url=url)
        await page.until("document.readyState === 'complete'")
        return page

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        end(self.proc)
        self.profile.cleanup()
