"""GET /metrics: the stack's Prometheus metrics, scraped from the real stack and parsed as
Prometheus would; with ?model=, still the model's own llama-server's."""

from __future__ import annotations

import json
from http.client import HTTPConnection

from prometheus_client.parser import text_string_to_metric_families

from services.proxy.manage.events import Events
from services.proxy.manage.metrics import Metrics, Turn
from tests.harness import http, wait
from tests.streams import chat, stream_chat
from tests.test_direct_path import model_process

TINY, OTHER = "ms/tiny:0.2m-f32", "ms/other:0.2m-f32"
Samples = list[tuple[str, dict[str, str], float]]


def scrape(stack, headers: dict | None = None) -> Samples:
    status, text = http("GET", stack.url + "/metrics", headers=headers)
    assert status == 200, text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def test_requests_loads_memory_and_unloads_per_model(stack_factory, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text(
        "models:\n  other:0.2m-f32:\n    sampler_args: --metrics\n")
    stack = stack_factory().start()
    for _ in range(2):
        assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    assert stream_chat(stack.url, OTHER)[-1]["model"] == OTHER
    tiny, other = {"model": TINY, "backend": "engine"}, {"model": OTHER, "backend": "engine"}
    route = {"route": "/v1/chat/completions", "status": "200"}
    # a stream is counted as its handler returns, which may be just after its client has read
    # its end
    wait(lambda: value(scrape(stack), "model_serve_requests_total", **other, **route) == 1,
         30)
    samples = scrape(stack)
    assert value(samples, "model_serve_requests_total", **tiny, **route) == 2
    assert value(samples, "model_serve_time_to_first_token_seconds_count", **tiny) == 2
    assert value(samples, "model_serve_time_to_first_token_seconds_count", **other) == 1
    assert value(samples, "model_serve_prefill_seconds_count", **other) == 1
    assert value(samples, "model_serve_queue_wait_seconds_count", **tiny) == 2
    assert value(samples, "model_serve_load_wait_seconds_count", **tiny) == 2
    assert value(samples, "model_serve_load_wait_seconds_sum", **tiny) > 0  # cold once
    # the tokens, from the whole answer's timings and from the stream's last event's
    assert value(samples, "model_serve_generated_tokens_total", **tiny) > 0
    assert value(samples, "model_serve_generated_tokens_total", **other) > 0
    assert value(samples, "model_serve_tokens_per_second_count", **other) == 1
    for labels in (tiny, other):
        assert value(samples, "model_serve_loads_total", **labels) == 1
        assert value(samples, "model_serve_load_seconds_count", **labels) == 1
        assert value(samples, "model_serve_load_seconds_sum", **labels) > 0
        assert value(samples, "model_serve_in_flight", **labels) == 0
        assert value(samples, "model_serve_model_state", **labels, state="loaded") == 1
        for kind in ("estimated", "measured"):
            assert value(samples, "model_serve_model_memory_bytes", **labels, kind=kind) > 0
    assert ("model_serve_queued", tiny, 0) in samples
    assert value(samples, "model_serve_system_memory_bytes", kind="total") > 0
    assert value(samples, "model_serve_governor_up") == 0  # none started

    # the model's own metrics stay where they were
    status, text = http("GET", f"{stack.url}/metrics?model={OTHER}")
    assert status == 200 and "llamacpp:" in text

    assert http("POST", stack.url + "/models/unload", {"model": TINY})[0] == 200
    samples = scrape(stack)
    assert value(samples, "model_serve_unloads_total", **tiny, reason="manual") == 1
    # the engine may list it a moment longer, while its process ends
    wait(lambda: value(scrape(stack), "model_serve_model_state", **tiny, state="loaded") == 0,
         30)
    assert value(scrape(stack), "model_serve_model_memory_bytes", **tiny) == 0

    # a model whose process ends unasked is counted as a crash once the proxy notices
    model_process(stack, OTHER).kill()
    wait(lambda: value(scrape(stack), "model_serve_unloads_total", **other,
                       reason="crash") == 1, 30)
    assert value(scrape(stack), "model_serve_unloads_total", **tiny) == 1  # nothing more


def test_a_client_leaving_mid_stream_is_a_499_one_leaving_at_its_end_is_not(
        stack_factory) -> None:
    stack = stack_factory().start()
    port = int(stack.env["HARMONY_PROXY_PORT"])
    long = {"max_tokens": 100000, "max_output_tokens": 100000, "ignore_eos": True,
            "stream": True}
    chat_route, responses = "/v1/chat/completions", "/v1/responses"
    # after the first event (most often), and later: a race, so several
    leaving = [(route, lines) for route in (chat_route, responses)
               for lines in (1, 1, 1, 1, 5, 5, 20, 20)]
    for route, lines in [*leaving, (chat_route, None)]:  # None: to the end
        body = chat(TINY, **long) if route == chat_route else {"model": TINY, "input": "hi",
                                                                 **long}
        if lines is None:
            body = chat(TINY, max_tokens=8, stream=True)
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        read = 0
        while (line := resp.readline()) and not line.startswith(b"data: [DONE]"):
            read += line.startswith(b"data: {")
            if lines is not None and read >= lines:
                break
        conn.close()  # at once, either mid-answer or on its last event
    tiny = {"model": TINY, "backend": "engine"}
    wait(lambda: value(scrape(stack), "model_serve_requests_total", **tiny) == 17, 30)
    samples = scrape(stack)
    for route in (chat_route, responses):  # the proxy's next write finds the client gone
        assert value(samples, "model_serve_requests_total", **tiny, route=route,
                     status="499") == 8
    assert value(samples, "model_serve_requests_total", **tiny, route=chat_route,
                 status="200") == 1
    assert value(samples, "model_serve_time_to_first_token_seconds_count", model=TINY) == 1
    assert "broke" not in (stack.root / "proxy.log").read_text()  # no crash is suspected


def test_the_governors_unloads_are_counted_by_their_cause(stack_factory, config_dir) -> None:
    (config_dir / "custom_models.yaml").write_text("models:\n  tiny:0.2m-f32:\n    ttl: 2\n")
    stack = stack_factory(PRESSURE_CHECK_INTERVAL="0.2", MIN_MODEL_AGE_SECONDS="0").start(
        "engine", "proxy", "governor")
    assert http("POST", stack.url + "/v1/chat/completions", chat(TINY))[0] == 200
    tiny = {"model": TINY, "backend": "engine"}
    assert value(scrape(stack), "model_serve_loads_total", **tiny, by="admission") == 1
    wait(lambda: value(scrape(stack), "model_serve_unloads_total", **tiny, reason="ttl") == 1,
         30)
    samples = scrape(stack)
    assert value(samples, "model_serve_unloads_total", **tiny) == 1  # not also as a crash
    assert value(samples, "model_serve_governor_up") == 1
    assert value(samples, "model_serve_system_memory_bytes", kind="limit") > 0


def test_an_admission_refusal_is_a_load_failure_by_its_code(stack_factory, tmp_path) -> None:
    machine = tmp_path / "memory.json"  # a machine too small for any model
    machine.write_text(json.dumps({"total": 1000, "base_used": 0}))
    stack = stack_factory(MEMORY_SIMULATION_FILE=str(machine)).start(
        "engine", "proxy", "governor")
    status, body = http("POST", stack.url + "/v1/chat/completions", chat(TINY))
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    samples = scrape(stack)
    tiny = {"model": TINY, "backend": "engine"}
    assert value(samples, "model_serve_load_failures_total", **tiny,
                 code="insufficient_memory") == 1
    assert value(samples, "model_serve_loads_total", **tiny) == 0
    assert value(samples, "model_serve_requests_total", **tiny, status="503") == 1


def test_tokens_of_the_answers_ollama_gives(stack_factory, real_ollama) -> None:
    real_ollama.create("olla:1b")  # Ollama's own: its store is not linked
    stack = stack_factory(OLLAMA_BASE=real_ollama.url).start()
    hi = [{"role": "user", "content": "hi"}]
    # greedy, so that every route gets the same answer, of the same length
    messages = {"model": "olla:1b", "max_tokens": 8, "messages": hi, "temperature": 0}
    status, answer = http("POST", stack.url + "/v1/messages", messages)  # Ollama's own route
    assert status == 200
    each = answer["usage"]["output_tokens"]
    # a stream whose message_start says 0 output tokens, its last event the count
    assert "message_stop" in http("POST", stack.url + "/v1/messages",
                                  {**messages, "stream": True})[1]
    status, answer = http("POST", stack.url + "/v1/chat/completions",
                          chat("olla:1b", 8, temperature=0))
    assert status == 200 and answer["usage"]["completion_tokens"] == each  # translated
    assert stream_chat(stack.url, "olla:1b", 8, temperature=0,
                       stream_options={"include_usage": True})
    lines = http("POST", stack.url + "/api/chat", {"model": "olla:1b", "messages": hi,
                                                    "options": {"num_predict": 8,
                                                                "temperature": 0}})[1]
    assert json.loads(lines.splitlines()[-1])["eval_count"] == each  # Ollama's API
    olla = {"model": "olla:1b", "backend": "ollama"}
    wait(lambda: value(scrape(stack), "model_serve_requests_total", **olla) == 5, 30)
    assert value(scrape(stack), "model_serve_generated_tokens_total", **olla) == 5 * each


def test_unloads_by_the_governor_keep_their_cause_and_signal(stack_factory) -> None:
    """What the governor sends /models/unload (tests/test_scheduler.py checks it sends it),
    with the stack's key: the cause becomes the reason; only a signal unload names signals,
    only as names. A client's unload is manual whatever it says."""
    stack = stack_factory().start()
    governor = {"X-Model-Serve-Key": (stack.state_dir / "engine.key").read_text().strip()}
    for reason, signal, headers in (
            ("signal", "psi,refault", governor), ("pressure", "psi", governor),
            ("signal", "a b", governor), ("my-own", "", governor),
            ("pressure", "", {}), ("signal", "forged", {"X-Model-Serve-Key": "guess"})):
        assert http("POST", stack.url + "/models/load", {"model": TINY})[0] == 200
        assert http("POST", stack.url + "/models/unload", {
            "model": TINY, "reason": reason, "signal": signal,
            "detail": f"{reason} detail"}, headers=headers)[0] == 200
        # gone from the engine before the next load (it lists it while its process ends)
        wait(lambda: not http("GET", stack.url + "/running")[1]["models"], 30)
    samples = scrape(stack)
    tiny = {"model": TINY, "backend": "engine"}
    assert value(samples, "model_serve_unloads_total", **tiny, reason="signal",
                 signal="psi,refault") == 1
    assert value(samples, "model_serve_unloads_total", **tiny, reason="pressure",
                 signal="") == 1
    assert value(samples, "model_serve_unloads_total", **tiny, reason="signal", signal="") == 1
    assert value(samples, "model_serve_unloads_total", **tiny, reason="manual") == 3
    assert value(samples, "model_serve_unloads_total", signal="forged") == 0
    events = [e for e in http("GET", stack.url + "/events")[1]["events"]
              if e["kind"] == "unloaded"]
    assert [(e["reason"], e["detail"]) for e in events] == [
        ("signal", "signal detail"), ("pressure", "pressure detail"),
        ("signal", "signal detail"), ("manual", "my-own detail"), ("manual", ""),
        ("manual", "")]


def test_metrics_ask_for_the_api_key(stack_factory) -> None:
    stack = stack_factory(API_KEY="secret").start()
    assert http("GET", stack.url + "/metrics")[0] == 401
    assert value(scrape(stack, {"Authorization": "Bearer secret"}),
                 "model_serve_governor_up") == 0


def test_usage_and_timings_are_read_from_the_answers_end() -> None:
    metrics, turn = Metrics(Events()), Turn("/v1/chat/completions", 0.0, "m", "engine", sent=0.0,
                                    first_byte=0.5)
    turn.end = (b'data: {"choices":[],"usage":{"completion_tokens":7},"timings":'
                b'{"prompt_ms":12.5,"predicted_n":8,"predicted_per_second":40.0}}\n\n'
                b'data: [DONE]\n\n')
    metrics.finish(turn, 200)
    labels = {"model": "m", "backend": "engine"}
    assert metrics.registry.get_sample_value("model_serve_generated_tokens_total",
                                             labels) == 8  # the engine's own count first
    assert metrics.registry.get_sample_value("model_serve_prefill_seconds_sum",
                                             labels) == 0.0125
    assert metrics.registry.get_sample_value("model_serve_tokens_per_second_sum",
                                             labels) == 40.0
    ollama = Turn("/api/chat", 0.0, "o", "ollama", end=b'{"done":true,"eval_count":5}')
    metrics.finish(ollama, 200)
    assert metrics.registry.get_sample_value("model_serve_generated_tokens_total",
                                             {"model": "o", "backend": "ollama"}) == 5
