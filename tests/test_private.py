"""Private by default: nothing but the stack drives the engine, the models' own servers or
the governor, and no other web page drives the proxy."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import psutil
from aiohttp import web

from shared.engines.base import section_name
from tests.browser import Chromium
from tests.harness import answers, free_port, http, wait
from tests.streams import chat

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
EVIL = {"Origin": "https://evil.example"}


def model_port(stack, model: str) -> int:
    engine = psutil.Process(stack.procs[0].pid)
    child = next(p for p in engine.children(recursive=True) if section_name(model) in p.cmdline())
    args = child.cmdline()
    return int(args[args.index("--port") + 1])


def loaded_ids(stack) -> list[str]:
    return [m["id"] for m in http("GET", stack.url + "/running")[1]["models"]]


def test_engine_and_model_servers_want_the_stacks_key(stack_factory) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    engine, model = stack.engine_url, f"http://127.0.0.1:{model_port(stack, TINY)}"
    for url in (engine + "/models", engine + "/v1/models", model + "/v1/models",
                model + "/slots"):
        assert http("GET", url)[0] == 401, url
        assert http("GET", url, headers={"Authorization": "Bearer guess"})[0] == 401, url
    assert http("POST", engine + "/models/unload", {"model": section_name(TINY)})[0] == 401
    assert http("POST", model + "/v1/chat/completions", chat(TINY))[0] == 401
    assert http("GET", model + "/v1/models", headers=stack.engine_headers)[0] == 200
    # the governor loads nothing: it has no route that would
    governor = f"http://127.0.0.1:{stack.env['GOVERNOR_PORT']}"
    stack.start("governor", wait=False)
    wait(lambda: answers(governor + "/health"))
    assert http("POST", governor + "/load", {"backend": "engine", "model": TINY})[0] == 404
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200



def test_other_web_pages_cannot_drive_the_proxy(stack_factory) -> None:
    stack = stack_factory().start()
    assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
    # a cross-site form post: text/plain needs no preflight, so only the Origin tells
    status, body = http("POST", stack.url + "/models/unload", json.dumps({"model": TINY}).encode(),
                        headers={**EVIL, "Content-Type": "text/plain"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert "CORS_ORIGINS" in body["error"]["message"]
    status, _ = http("POST", stack.url + "/models/unload", {"model": TINY},
                     headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert http("OPTIONS", stack.url + "/v1/chat/completions", headers=EVIL)[0] == 403
    assert TINY in loaded_ids(stack)
    # DNS rebinding: the page's own name now points here
    status, body = http("GET", stack.url + "/v1/models", headers={"Host": "rebind.evil.example"})
    assert status == 403 and body["error"]["code"] == "host_not_allowed"
    for host in ("localhost", "127.0.0.1", f"localhost:{stack.env['HARMONY_PROXY_PORT']}",
                 "[::1]:1", "192.168.1.20"):
        assert http("GET", stack.url + "/v1/models", headers={"Host": host})[0] == 200, host
    # the proxy's own pages (the dashboard) are not cross-origin
    own = {"Origin": stack.url}
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY), headers=own)[0] == 200


def test_configured_origins_and_hosts_are_let_in(stack_factory) -> None:
    app = "http://localhost:3000"
    stack = stack_factory(CORS_ORIGINS=app, ALLOWED_HOSTS="mybox.lan").start()
    # what the openai SDK sends from a browser page
    asked = "authorization, content-type, x-stainless-lang, x-stainless-retry-count"
    preflight = {"Origin": app, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": asked}
    req = urllib.request.Request(stack.url + "/v1/chat/completions", method="OPTIONS",
                                 headers=preflight)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Headers"] == asked
    req = urllib.request.Request(
        stack.url + "/v1/chat/completions", data=json.dumps(chat(TINY, stream=True)).encode(),
        headers={"Origin": app, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Access-Control-Allow-Origin"] == app  # streamed answers too
        assert b"[DONE]" in r.read()
    assert http("GET", stack.url + "/v1/models", headers={"Host": "mybox.lan:80"})[0] == 200
    assert http("GET", stack.url + "/v1/models", headers={"Origin": "http://localhost:3001"})[
        0] == 403


def test_the_key_needs_bearer_and_booleans_are_strict(stack_factory) -> None:
    stack = stack_factory(API_KEY="s3cret").start()
    url = stack.url + "/v1/models"
    assert http("GET", url, headers={"Authorization": "s3cret"})[0] == 401
    assert http("GET", url, headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert http("GET", url, headers={"Authorization": "bearer s3cret"})[0] == 200
    assert http("GET", url, headers={"x-api-key": "s3cret"})[0] == 200  # Anthropic's SDKs
    key = {"Authorization": "Bearer s3cret"}
    assert http("POST", stack.url + "/models/load", {"model": TINY}, headers=key)[0] == 200
    status, body = http("POST", stack.url + "/models/unload",
                        {"model": TINY, "force": "no"}, headers=key)
    assert status == 400 and "'force' must be true or false" in body["error"]["message"]
    status, body = http("POST", stack.url + "/v1/chat/completions",
                        chat(TINY, stream="yes"), headers=key)
    assert status == 400 and body["error"]["code"] == "invalid_type"


def test_pages_on_other_addresses_are_other_sites(stack_factory) -> None:
    """Any server on the network can serve a page on the proxy's port; only the stack's own
    names and loopback addresses are the proxy's own pages."""
    stack = stack_factory().start()
    port = stack.env["HARMONY_PROXY_PORT"]
    assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
    for host in ("203.0.113.7", "192.168.1.66", "10.0.0.9", "[2001:db8::1]"):
        page = {"Origin": f"http://{host}:{port}"}
        status, body = http("POST", stack.url + "/models/unload",
                            json.dumps({"model": TINY}).encode(),
                            headers={**page, "Content-Type": "text/plain"})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", host
        assert http("GET", stack.url + "/running", headers=page)[0] == 403, host
        assert http("DELETE", stack.url + "/api/delete", {"model": "x"}, headers=page)[0] == 403
        assert http("POST", stack.url + "/v1/chat/completions", chat(TINY),
                    headers=page)[0] == 403, host
    assert TINY in loaded_ids(stack)
    for own in (f"http://localhost:{port}", f"http://127.0.0.2:{port}", f"http://[::1]:{port}"):
        assert http("GET", stack.url + "/running", headers={"Origin": own})[0] == 200, own
    # a page on another port of this machine is another web app
    assert http("GET", stack.url + "/running",
                headers={"Origin": "http://127.0.0.1:8080"})[0] == 403
    # the dashboard opened at the address it is served on (LISTEN_HOST=0.0.0.0, say)
    lan = {"Host": f"192.168.1.5:{port}", "Origin": f"http://192.168.1.5:{port}"}
    assert http("GET", stack.url + "/running", headers=lan)[0] == 200


def test_cross_site_gets_load_nothing(stack_factory) -> None:
    """`<img src=".../props?model=X">` on any page would load X, and admission would evict
    idle models for it."""
    stack = stack_factory().start()
    image = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
             "Sec-Fetch-Dest": "image"}
    for path in ("/props", "/slots", "/metrics"):
        status, body = http("GET", f"{stack.url}{path}?model={TINY}", headers=image)
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", path
        # a browser that sends no Sec-Fetch-Site still sends the page as its Referer
        status, _ = http("GET", f"{stack.url}{path}?model={TINY}",
                         headers={"Referer": "https://evil.example/page.html"})
        assert status == 403, path
    assert loaded_ids(stack) == []
    # reading changes nothing: the stack's own metrics, the model list, the dashboard
    assert http("GET", stack.url + "/metrics", headers=image)[0] == 200
    assert http("GET", stack.url + "/v1/models", headers=image)[0] == 200
    # the dashboard's own requests, a typed-in address, a program (no browser headers)
    for headers in ({"Sec-Fetch-Site": "same-origin", "Referer": stack.url + "/"},
                    {"Sec-Fetch-Site": "none"}, {}):
        assert http("GET", f"{stack.url}/props?model={TINY}", headers=headers)[0] == 200
    assert TINY in loaded_ids(stack)


def test_a_page_of_another_site_in_a_browser_changes_nothing(stack_factory) -> None:
    """Real Chromium opens a page of another site (evil.test, resolved to this machine) that
    asks the proxy for a model in an image tag and posts an unload as a form would."""
    stack = stack_factory().start()
    assert http("POST", stack.url + "/models/load", {"model": OTHER})[0] == 200
    page_html = f"""<img id="img" src="{stack.url}/props?model={TINY}">
<script>
window.sent = fetch("{stack.url}/models/unload", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({{model: "{OTHER}"}})}})
  .then(() => "sent", e => "failed: " + e);
</script>"""

    async def serve_page(_: web.Request) -> web.Response:
        return web.Response(text=page_html, content_type="text/html")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/", serve_page)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with Chromium(1280, 860, "--host-resolver-rules=MAP evil.test 127.0.0.1") \
                    as browser:
                page = await browser.open(f"http://evil.test:{port}/")
                await page.until("document.getElementById('img').complete")
                assert await page.js("window.sent") == "sent"
                assert await page.js("document.getElementById('img').naturalWidth") == 0
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert loaded_ids(stack) == [OTHER]
