"""Private by default: nothing but the stack drives the engine, the models' own servers or
the governor, and no other web page drives the proxy."""

from __future__ import annotations

import json
import urllib.request

import psutil

from shared.engines.base import section_name
from tests.harness import answers, http, wait
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"
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
    # the governor loads only for the proxy
    governor = f"http://127.0.0.1:{stack.env['GOVERNOR_PORT']}"
    stack.start("governor", wait=False)
    wait(lambda: answers(governor + "/health"))
    assert http("POST", governor + "/load", {"backend": "engine", "model": TINY})[0] == 401
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
    preflight = {"Origin": app, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, _ = http("OPTIONS", stack.url + "/v1/chat/completions", headers=preflight)
    assert status == 204
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
