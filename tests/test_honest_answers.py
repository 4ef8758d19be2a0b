"""Answers that never lie and always come: a cut answer is an error the SDK raises, bad
input is a JSON error, a slow or vanished client costs nothing."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.client import HTTPConnection

import anthropic
import openai
import psutil
import pytest

from shared.engines.base import section_name
from shared.tiny_gguf import write_model
from tests.harness import http, wait
from tests.streams import chat

TINY = "ms/tiny:0.2m-f32"
SLOW = "ms/slow:33.8m-f32"


@pytest.fixture
def slow_stack(stack_factory, models_dir):
    """A model slow enough on this machine that a request is still running when we act."""
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    stack = stack_factory()
    stack.start()
    assert http("POST", stack.url + "/models/load", {"model": SLOW})[0] == 200
    return stack


def model_process(stack, model: str) -> psutil.Process:
    engine = psutil.Process(stack.procs[0].pid)
    return next(p for p in engine.children(recursive=True) if section_name(model) in p.cmdline())


def generating(stack, model: str) -> bool:
    url = f"{stack.engine_url}/slots?model={section_name(model)}"
    status, slots = http("GET", url, headers=stack.engine_headers)
    return status == 200 and any(s["is_processing"] for s in slots)


def long_answer() -> dict:
    return chat(SLOW, max_tokens=100000, ignore_eos=True)


def sdk_request() -> dict:
    body = long_answer()
    extra = {"ignore_eos": body.pop("ignore_eos")}
    return {**body, "extra_body": extra}


def test_a_model_killed_mid_stream_is_an_error_the_sdk_raises(slow_stack) -> None:
    client = openai.OpenAI(base_url=slow_stack.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(**sdk_request(), stream=True)
    received = 0
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            received += 1
            if received == 5:
                model_process(slow_stack, SLOW).kill()
    assert "may have crashed" in str(raised.value) and "model logs engine" in str(raised.value)
    assert received >= 5


def test_a_model_killed_mid_answer_is_an_openai_error(slow_stack) -> None:
    client = openai.OpenAI(base_url=slow_stack.url + "/v1", api_key="unused", max_retries=0)
    victim = model_process(slow_stack, SLOW)

    def kill_when_busy() -> None:
        wait(lambda: generating(slow_stack, SLOW), 30)
        victim.kill()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(**sdk_request())
    killer.join()
    assert raised.value.status_code == 502 and raised.value.body["code"] == "engine_error"
    assert "may have crashed" in raised.value.body["message"]  # JSON the SDK parsed


def test_the_engine_dying_mid_answer_is_an_openai_error(slow_stack) -> None:
    router = next(p for p in psutil.Process(slow_stack.procs[0].pid).children()
                  if "llama-server" in p.name())
    conn = HTTPConnection("127.0.0.1", int(slow_stack.env["HARMONY_PROXY_PORT"]), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(long_answer()),
                 {"Content-Type": "application/json"})
    wait(lambda: generating(slow_stack, SLOW), 30)
    router.kill()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 502 and resp.getheader("Content-Type").startswith("application/json")
    assert "broke before it answered" in body["error"]["message"]


def test_the_engine_service_dying_mid_answer_takes_its_servers_along(slow_stack) -> None:
    service = psutil.Process(slow_stack.procs[0].pid)
    servers = [p for p in service.children(recursive=True) if "llama-server" in p.name()]
    conn = HTTPConnection("127.0.0.1", int(slow_stack.env["HARMONY_PROXY_PORT"]), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(long_answer()),
                 {"Content-Type": "application/json"})
    wait(lambda: generating(slow_stack, SLOW), 30)
    service.kill()  # no chance to stop what it started
    resp = conn.getresponse()
    assert resp.status == 502 and "may have crashed" in json.loads(resp.read())["error"][
        "message"]
    psutil.wait_procs(servers, timeout=30)
    assert not [p for p in servers if p.is_running()]  # router and model servers: none left


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/models/load", "/models/unload"])
def test_absurd_bodies_get_json_errors(stack_factory, path) -> None:
    stack = stack_factory(MAX_MESSAGES="1000").start()
    nested = b'{"model": "' + TINY.encode() + b'", "messages": ' + b"[" * 100000 + \
        b"]" * 100000 + b"}"
    status, body = http("POST", stack.url + path, nested)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    many = chat(TINY) | {"messages": [{"role": "user", "content": "hi"}] * 200000}
    status, body = http("POST", stack.url + path, many)
    if path == "/v1/chat/completions":
        assert status == 400 and body["error"]["code"] == "too_many_messages"
        assert "MAX_MESSAGES" in body["error"]["message"]
    assert http("GET", stack.url + "/health")[0] == 200


def test_half_sent_requests_are_closed_and_cost_nothing(stack_factory) -> None:
    stack = stack_factory(REQUEST_READ_TIMEOUT="1").start()
    port = int(stack.env["HARMONY_PROXY_PORT"])
    headers_only = socket.create_connection(("127.0.0.1", port))
    headers_only.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
    body_half = socket.create_connection(("127.0.0.1", port))
    body_half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
    for sock in (headers_only, body_half):
        sock.settimeout(60)
    assert headers_only.recv(4096) == b""  # closed by the proxy, not left open
    answer = body_half.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408") and "REQUEST_READ_TIMEOUT" in answer
    # and whoever sends whole requests is served meanwhile
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200


def test_a_declared_size_over_the_limit_is_refused_at_once(stack_factory) -> None:
    stack = stack_factory(REQUEST_READ_TIMEOUT="600").start()
    sock = socket.create_connection(("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{")
    sock.settimeout(60)  # far below the read timeout: only an answer up front gets here
    answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and "MAX_BODY_BYTES" in answer
    # null is "not given", as OpenAI takes it; a model that is not a string says so
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY, stream=None))[0] == 200
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(5))
    assert status == 400 and "'model' must be a string" in body["error"]["message"]


def test_oversized_headers_get_an_error_the_sdks_read(stack_factory) -> None:
    stack = stack_factory().start()
    huge = {"X-Trace": "secret-123" + "x" * 100_000}
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="none", max_retries=0,
                           default_headers=huge)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 431 and "over 65536 bytes" in e.value.message
    claude = anthropic.Anthropic(base_url=stack.url, api_key="none", max_retries=0,
                                 default_headers=huge)
    with pytest.raises(anthropic.APIStatusError) as e:
        claude.messages.create(model=TINY, max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 431 and e.value.body["error"]["type"] == \
        "invalid_request_error"
    # a browser sends the cookies of every app on localhost to every port
    cookies = {"Cookie": "; ".join(f"app{n}=" + "c" * 1000 for n in range(20))}
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY), headers=cookies)[0] == 200
    many = "".join(f"X-H{n}: {n}\r\n" for n in range(200)).encode()
    sock = socket.create_connection(("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"])))
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
    sock.settimeout(30)
    answer = sock.recv(65536).decode()
    assert " 431 " in answer.splitlines()[0] and "more than 128 headers" in answer
    log = (stack.root / "proxy.log").read_text()
    # one line each, and what the header held (a cookie, a key) stays out of the log
    assert log.count("refused a request") == 3 and "Traceback" not in log
    assert "secret-123" not in log


def test_a_client_that_stops_reading_frees_its_models_slot(stack_factory, models_dir,
                                                           config_dir) -> None:
    write_model(models_dir / "pub" / "slow" / "slow-F32.gguf", name="slow", n_embd=512,
                n_layer=8)
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  slow:33.8m-f32:\n    write_timeout: 2\n")
    stack = stack_factory().start()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", int(stack.env["HARMONY_PROXY_PORT"])))
    # a stream at the model's own pace to a client with a small receive buffer: far less
    # than would fill every socket between, and the client takes none of it
    body = json.dumps(chat(SLOW, stream=True) | {"max_tokens": 6000,
                                                  "ignore_eos": True}).encode()
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    def serving() -> bool:
        rows = http("GET", stack.url + "/running")[1]["models"]
        return any(r["id"] == SLOW and r["queue"]["active"] == 1 for r in rows)
    wait(serving, 60)
    # the model answers one request at a time, and the client holding it takes nothing
    started = time.monotonic()
    assert http("POST", stack.url + "/v1/chat/completions", chat(SLOW), timeout=60)[0] == 200
    print(f"answered after {time.monotonic() - started:.1f} s")
    assert "took nothing of its answer" in (stack.root / "proxy.log").read_text()
    # the stalled answer was cut, not finished: what the client finds when it reads at last
    stalled.settimeout(30)
    got = b""
    while chunk := stalled.recv(65536):
        got += chunk
    assert got.startswith(b"HTTP/1.1 200") and b"[DONE]" not in got
    stalled.close()
