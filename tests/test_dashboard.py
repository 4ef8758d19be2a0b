"""The dashboard at /, in headless Chromium against the real stack: models appear loaded after
a request and unloaded after an unload in rows that keep their place, events arrive live, the
buttons work (behind the API key when one is set, and a refused key is said to be), a model
answering is not shown idle, and data the proxy no longer confirms is marked old; and the
events feed itself."""

from __future__ import annotations

import asyncio
import json
import struct
from http.client import HTTPConnection
from pathlib import Path

import aiohttp
import pytest

from services.proxy.manage.events import BACKLOG, Events
from tests.browser import Chromium, Page
from tests.harness import http
from tests.streams import chat

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
ROWS = "[...document.querySelectorAll('#models tbody tr')].map(tr => tr.dataset.model)"
PROBLEM = "document.getElementById('problem').textContent"


def row_state(model: str) -> str:
    return f"document.querySelector('tr[data-model=\"{model}\"]')?.dataset.state"


def event_shown(kind: str, model: str, text: str = "") -> str:
    return (f"[...document.querySelectorAll('#events li[data-kind=\"{kind}\"]')]"
            f".some(li => li.dataset.model === '{model}' && li.textContent.includes('{text}'))")


async def click(page: Page, model: str, action: str) -> None:
    await page.js(f"document.querySelector('tr[data-model=\"{model}\"] "
                  f"button[data-action=\"{action}\"]').click()")


def idle_cell(model: str) -> str:
    return f"document.querySelector('tr[data-model=\"{model}\"] td:nth-child(5)').textContent"


def visible(element_id: str) -> str:
    return f"getComputedStyle(document.getElementById('{element_id}')).display !== 'none'"


def streaming(stack, headers: dict) -> HTTPConnection:
    """A request that keeps its model answering until the connection is closed."""
    conn = HTTPConnection("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"]), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        chat(TINY, max_tokens=100000, ignore_eos=True, stream=True)),
        {"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):  # under way; left unread, the stream then waits for its reader
        resp.readline()
    return conn


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_dashboard_follows_the_stack_live(stack_factory, tmp_path: Path) -> None:
    stack = stack_factory().start("engine", "proxy", "governor")

    async def scenario() -> None:
        async with Chromium() as browser:
            # the first paint, before any data has come, says the models are on their way
            status, html = await asyncio.to_thread(http, "GET", stack.url + "/", None,
                                                   {"Accept": "text/html"})
            assert status == 200 and "Loading the models" in html
            page = await browser.open(stack.url + "/")
            assert await page.until(row_state(TINY)) == "unloaded"
            assert await page.until("document.getElementById('governor').textContent") == \
                "governor up"
            catalog = [m["id"] for m in (await asyncio.to_thread(
                http, "GET", stack.url + "/v1/models"))[1]["data"]]
            assert await page.js(ROWS) == catalog
            assert not await page.js(visible("key-form"))  # no key asked for: none is set
            await page.until("document.getElementById('live').textContent === 'live'")

            # a client's request loads the model: the page shows it, and the event, unasked
            assert (await asyncio.to_thread(http, "POST", stack.url + "/v1/chat/completions",
                                            chat(TINY)))[0] == 200
            await page.until(f"{row_state(TINY)} === 'loaded'")
            await page.until(event_shown("loaded", TINY, f"{TINY} (engine) in "))
            # a loaded model keeps its row's place: a second click lands on the same model
            assert await page.js(ROWS) == catalog
            memory = await page.js(f"document.querySelector('tr[data-model=\"{TINY}\"] "
                                   "td.memory').textContent")
            assert "MiB" in memory
            assert "% of" in await page.js("document.getElementById('memory-text').textContent")

            # an unload from elsewhere (the API): gone from the loaded ones, with its reason
            assert (await asyncio.to_thread(http, "POST", stack.url + "/models/unload",
                                            {"model": TINY}))[0] == 200
            await page.until(f"{row_state(TINY)} === 'unloaded'")
            await page.until(event_shown("unloaded", TINY, "manual"))
            # its conversation was saved before it left, for its next load
            await page.until(event_shown("context_saved", TINY, "tokens"))
            assert "tokens" in await page.until(
                f"document.querySelector('tr[data-model=\"{TINY}\"] .saved').textContent")

            # the buttons: load, then unload, from the page
            await click(page, OTHER, "load")
            await page.until(f"{row_state(OTHER)} === 'loaded'")
            await page.until(event_shown("loaded", OTHER))
            running = (await asyncio.to_thread(http, "GET",
                                                stack.url + "/running"))[1]
            assert [m["id"] for m in running["models"]] == [OTHER]
            await page.screenshot(tmp_path / "dashboard.png")
            await click(page, OTHER, "unload")
            await page.until(f"{row_state(OTHER)} === 'unloaded'")
            await page.until(event_shown("unloaded", OTHER))
            running = (await asyncio.to_thread(http, "GET",
                                                stack.url + "/running"))[1]
            assert running["models"] == []

            # the proxy goes away: what was shown stays, marked as old
            await asyncio.to_thread(stack.stop)
            assert "the proxy is not answering" in await page.until(
                f"{PROBLEM}.startsWith('Last update') && {PROBLEM}")
            assert await page.js("document.getElementById('governor').textContent") == \
                "governor unknown"
            assert await page.js("document.getElementById('models').classList.contains('stale')")

    asyncio.run(scenario())
    width, height = png_size(tmp_path / "dashboard.png")
    assert width >= 1000 and height >= 400


def test_dashboard_asks_for_the_api_key(stack_factory) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    # the page itself holds no data: served without the key; the data is not
    status, page_html = http("GET", stack.url + "/", headers={"Accept": "text/html"})
    assert status == 200 and "<title>model-serve</title>" in page_html
    assert http("GET", stack.url + "/dashboard/dashboard.js")[0] == 200
    assert http("GET", stack.url + "/running")[0] == 401
    assert http("GET", stack.url + "/events")[0] == 401
    assert http("GET", stack.url + "/dashboard/../../pyproject.toml")[0] == 404

    async def scenario() -> None:
        async with Chromium() as browser:
            page = await browser.open(stack.url + "/")
            await page.until(visible("key-form"))
            assert await page.js(f"document.querySelector('tr[data-model=\"{TINY}\"]')") is None
            # nothing to show yet, and the page says why rather than show empty figures
            assert "enter the API key" in await page.js(PROBLEM)
            assert "enter the API key" in await page.js(
                "document.querySelector('#models tbody').textContent")
            assert await page.js(
                "getComputedStyle(document.getElementById('memory-used')).width") == "0px"
            assert not await page.js(visible("governor"))

            async def enter(key: str) -> None:
                await page.js(f"document.getElementById('key').value = '{key}';"
                              "document.getElementById('key-form').requestSubmit()")

            await enter("wrong")
            await page.until(f"{PROBLEM}.includes('the key was refused')")
            await enter("s3cret")
            assert await page.until(row_state(TINY)) == "unloaded"
            await page.until(f"!({visible('key-form')})")
            await page.until("document.getElementById('live').textContent === 'live'")
            await click(page, TINY, "load")
            await page.until(f"{row_state(TINY)} === 'loaded'")
            await page.until(event_shown("loaded", TINY))

            # a model answering a request is in use, not idle
            conn = await asyncio.to_thread(streaming, stack, {"Authorization": "Bearer s3cret"})
            try:
                await page.until(f"{idle_cell(TINY)} === 'in use'")
            finally:
                conn.close()

    asyncio.run(scenario())


def test_ollama_clients_still_get_their_answer_at_the_root(stack_factory) -> None:
    stack = stack_factory().start()
    for accept in (None, "*/*", "application/json"):
        headers = {"Accept": accept} if accept else {}
        assert http("GET", stack.url + "/", headers=headers) == (200, "Ollama is running")
    assert http("HEAD", stack.url + "/")[0] == 200


def test_events_feed_recent_and_live(stack_factory) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
    status, body = http("GET", stack.url + "/events")
    assert status == 200
    kinds = [(e["kind"], e["model"]) for e in body["events"]]
    assert kinds == [("loading", TINY), ("loaded", TINY)]
    loading, loaded = body["events"]
    assert http("GET", stack.url + f"/events?since={loading['id']}") == \
        (200, {"events": [loaded]})
    for query, headers in (("?since=abc", {}), ("?since=-1", {}),
                           ("", {"Last-Event-ID": "1.5"})):
        status, error = http("GET", stack.url + "/events" + query, headers=headers)
        assert (status, error["error"]["code"]) == (400, "invalid_request"), (query, headers)

    async def live() -> list[dict]:
        async with aiohttp.ClientSession() as session, session.get(
                stack.url + "/events", headers={"Accept": "text/event-stream",
                                                "Last-Event-ID": str(loaded["id"])}) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await asyncio.to_thread(http, "POST", stack.url + "/models/unload",
                                    {"model": TINY})
            line = b""
            while not line.startswith(b"data: "):
                line = await asyncio.wait_for(resp.content.readline(), 30)
            return [json.loads(line[6:])]

    (event,) = asyncio.run(live())  # only what came after the last one it had
    assert (event["kind"], event["model"], event["reason"]) == ("unloaded", TINY, "manual")


@pytest.mark.parametrize("slow", [True, False])
def test_a_reader_that_falls_behind_is_let_go_others_keep_up(slow: bool) -> None:
    async def go() -> None:
        feed = Events()
        with feed.reader() as behind, feed.reader() as keeping_up:
            for i in range(BACKLOG + (1 if slow else 0)):
                feed.emit("loaded", f"m{i}", "engine")
                keeping_up.get_nowait()
            if slow:  # its queue ends with the end mark: it reconnects for the rest
                assert behind.qsize() == 1 and behind.get_nowait() is None
            else:
                assert behind.qsize() == BACKLOG
            assert keeping_up.empty()
            feed.close()
            assert keeping_up.get_nowait() is None
        *_, before, last = feed.recent
        assert feed.since(before["id"]) == [last]

    asyncio.run(go())
