"""The stack's Prometheus metrics, GET /metrics (without ?model=, which is the model's own
llama-server's). Requests, their time to first token and its parts, tokens, loads and unloads
are counted where the proxy already sees them, a few updates per request; memory, queues and
what is loaded are read at scrape time, by the functions /running uses."""

from __future__ import annotations

import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from services.proxy.manage.events import Events
from shared.loading import Key, LoadError

# a `*_created` series per counter and histogram only says when the proxy started counting,
# which a restart's reset already tells Prometheus: it would double every series for nothing
disable_created_metrics()

MODEL = ["model", "backend"]
# from a warm model's first token (tens of ms) to a cold load of a large one (minutes)
SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# llama-server's `timings` (its own measure), else the usage the API reports; searched in the
# answer's last bytes only, so no chunk is parsed as JSON
_GENERATED = (re.compile(rb'"predicted_n":\s*(\d+)'),
              re.compile(rb'"(?:completion_tokens|output_tokens|eval_count)":\s*(\d+)'))
_RATE = re.compile(rb'"predicted_per_second":\s*([0-9.eE+-]+)')
_PROMPT_MS = re.compile(rb'"prompt_ms":\s*([0-9.eE+-]+)')
_PROMPT_N = re.compile(rb'"prompt_n":\s*(\d+)')
_CACHE_N = re.compile(rb'"cache_n":\s*(\d+)')
END_BYTES = 4096


# the causes the governor gives /models/unload (services/governor/scheduler.py); anything
# else a client sends is its own decision, and would only add label values
GOVERNOR_CAUSES = frozenset({"ttl", "pressure", "signal", "admission"})


def unload_reason(given: object) -> str:
    return given if isinstance(given, str) and given in GOVERNOR_CAUSES else "manual"


@dataclass
class Turn:
    """One request's way through the proxy, filled in by whoever sees each part."""
    route: str
    start: float
    model: str = ""
    backend: str = ""
    queued: float = 0.0
    loading: float = 0.0
    sent: float | None = None  # its turn began: the request goes to the backend
    first_byte: float | None = None
    sent_status: int | None = None  # the status line sent, once it is
    complete: bool = False  # a stream's last event was sent
    end: bytes = b""  # the answer's last bytes, where usage and timings are

    def ending(self, data: bytes) -> None:
        """Keeps the end of the answer: llama-server writes `usage` and `timings` last, and a
        large answer (many embeddings) is not searched whole."""
        self.end = data[-END_BYTES:]


@dataclass
class Series:
    """One model's per-request series (its `model` and `backend` labels applied)."""
    in_flight: Gauge
    ttft: Histogram
    queue_wait: Histogram
    load_wait: Histogram
    prefill: Histogram
    generated: Counter
    rate: Histogram


TURN: ContextVar[Turn | None] = ContextVar("turn", default=None)


def turn() -> Turn | None:
    """The current request's turn, if it is a request the metrics follow."""
    return TURN.get()


def answer_end(data: bytes) -> None:
    """The end of the current request's answer, as sent: where its usage and timings are.
    The answer is whole: a client that leaves from now on (a stream's often closes on its
    last event) has had all of it."""
    if t := TURN.get():
        t.ending(data)
        t.complete = True


def _number(pattern: re.Pattern[bytes], data: bytes) -> float | None:
    """The last one: a stream's earlier events may hold a count so far (Anthropic's
    message_start has output_tokens 0)."""
    found = pattern.findall(data)
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


class Metrics:
    """One registry per app, so that tests creating several apps do not share counters. Loads,
    unloads and refusals are also told to `events`, the dashboard's live feed: one call where
    each happens."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("model_serve_requests", "Requests that named a served model, "
                                "by route and the status answered", [*MODEL, "route", "status"],
                                registry=reg)
        self.in_flight = Gauge("model_serve_in_flight", "Requests being answered or waiting",
                               MODEL, registry=reg)
        self.ttft = Histogram("model_serve_time_to_first_token_seconds", "From the request's "
                              "arrival to the answer's first byte", MODEL, buckets=SECONDS,
                              registry=reg)
        self.queue_wait = Histogram("model_serve_queue_wait_seconds", "Time queued behind the "
                                    "model's max_concurrent answers", MODEL, buckets=SECONDS,
                                    registry=reg)
        self.load_wait = Histogram("model_serve_load_wait_seconds", "Time a request waited "
                                   "for its model to load", MODEL, buckets=SECONDS,
                                   registry=reg)
        self.prefill = Histogram("model_serve_prefill_seconds", "The engine's prompt_ms, else "
                                 "from sending the request to the first byte", MODEL,
                                 buckets=SECONDS, registry=reg)
        self.generated = Counter("model_serve_generated_tokens", "Tokens generated, as the "
                                 "answer's timings or usage report them", MODEL, registry=reg)
        self.rate = Histogram("model_serve_tokens_per_second", "Generation speed, from the "
                              "engine's timings.predicted_per_second", MODEL, buckets=RATES,
                              registry=reg)
        self.loads = Counter("model_serve_loads", "Models loaded for a request or "
                             "/models/load; by: governor (admitted) or proxy (no governor)",
                             [*MODEL, "by"], registry=reg)
        self.load_seconds = Histogram("model_serve_load_seconds", "Duration of the loads",
                                      MODEL, buckets=SECONDS, registry=reg)
        self.load_failures = Counter("model_serve_load_failures", "Loads refused (the "
                                     "governor's admission: code insufficient_memory, ...) "
                                     "or failed", [*MODEL, "code"], registry=reg)
        self.unloads = Counter("model_serve_unloads", "Models unloaded, by reason: ttl, "
                               "pressure, signal (with the OS signals that fired), "
                               "admission (the governor's), manual, crash (its process "
                               "ended unasked), engine-reload (the engine stopped it to "
                               "take up a new config), expired (Ollama's keep_alive)",
                               [*MODEL, "reason", "signal"], registry=reg)
        self.context_saves = Counter("model_serve_context_saves", "Slots saved to "
                                     "CONTEXT_CACHE_DIR before their model left", MODEL,
                                     registry=reg)
        self.context_restores = Counter("model_serve_context_restores", "Saved slots read "
                                        "back after a load, and proven", MODEL,
                                        registry=reg)
        self.context_restored_tokens = Counter("model_serve_context_restored_tokens",
                                               "Tokens of context restored, not prefilled",
                                               MODEL, registry=reg)
        self.context_restore_failures = Counter(
            "model_serve_context_restore_failures", "Saved slots not restored, by reason: "
            "refused (llama-server would not read the file), not_in_cache (read, but not "
            "found by a request of its tokens), error", [*MODEL, "reason"], registry=reg)
        self.live = Live()
        reg.register(self.live)
        self._series: dict[tuple[str, str], Series] = {}
        # each model's last context (tokens) and prefill speed (tokens/s), as its engine
        # timed them: what bringing that context back without a saved cache would cost
        self.contexts: dict[str, tuple[int, float]] = {}
        self._requests: dict[tuple[str, str, str, int], Counter] = {}

    # ---- the hot path: a few updates per request ------------------------------------------

    def begin(self, route: str) -> Turn:
        t = Turn(route, time.monotonic())
        TURN.set(t)
        return t

    def series(self, model: str, backend: str) -> Series:
        """The model's labelled series, looked up once: prometheus_client's labels() costs
        more than the update itself."""
        found = self._series.get((model, backend))
        if found is None:
            labels = (model, backend)
            found = self._series[labels] = Series(
                *(m.labels(*labels) for m in (self.in_flight, self.ttft, self.queue_wait,
                                              self.load_wait, self.prefill, self.generated,
                                              self.rate)))
        return found

    def finish(self, t: Turn, status: int) -> None:
        if not t.model:  # refused before a model was found: not a model's request
            return
        key = (t.model, t.backend, t.route, status)
        if (counted := self._requests.get(key)) is None:
            counted = self._requests[key] = self.requests.labels(*key[:3], str(status))
        counted.inc()
        if status >= 400:
            return
        series = self.series(t.model, t.backend)
        first = t.first_byte or time.monotonic()
        series.ttft.observe(first - t.start)
        # every request, a warm one's wait as ~0: TTFT's parts have the same count as TTFT
        series.queue_wait.observe(t.queued)
        series.load_wait.observe(t.loading)
        prompt_ms = _number(_PROMPT_MS, t.end)
        if prompt_ms is not None:
            series.prefill.observe(prompt_ms / 1000)
            prompt_n = _number(_PROMPT_N, t.end) or 0
            if prompt_ms > 0 and prompt_n:
                context = prompt_n + (_number(_CACHE_N, t.end) or 0) + \
                    (_number(_GENERATED[0], t.end) or 0)
                self.contexts[t.model] = (int(context), prompt_n * 1000 / prompt_ms)
        elif t.sent is not None:
            series.prefill.observe(first - t.sent)
        generated = _number(_GENERATED[0], t.end) or _number(_GENERATED[1], t.end)
        if generated:
            series.generated.inc(generated)
        if (rate := _number(_RATE, t.end)) is not None:
            series.rate.observe(rate)

    # ---- loads and unloads ----------------------------------------------------------------

    def loading(self, key: Key, model: str) -> None:
        self.events.emit("loading", model, key[0])

    def loaded(self, key: Key, model: str, by: str, seconds: float) -> None:
        self.loads.labels(model, key[0], by).inc()
        self.load_seconds.labels(model, key[0]).observe(seconds)
        self.events.emit("loaded", model, key[0], by=by, seconds=round(seconds, 2))

    def load_failed(self, key: Key, model: str, error: LoadError) -> None:
        self.load_failures.labels(model, key[0], error.code).inc()
        self.events.emit("refused" if error.code == "insufficient_memory" else "load_failed",
                         model, key[0], code=error.code, message=error.message)

    def unloaded(self, key: Key, model: str, reason: str, detail: str = "",
                 signal: str = "") -> None:
        self.unloads.labels(model, key[0], reason, signal).inc()
        self.events.emit("unloaded", model, key[0], reason=reason, detail=detail,
                         signal=signal)

    def context_saved(self, model: str, slot: int, tokens: int, size: int,
                      seconds: float) -> None:
        self.context_saves.labels(model, "engine").inc()
        self.events.emit("context_saved", model, "engine", slot=slot, tokens=tokens,
                         bytes=size, seconds=round(seconds, 2))

    def context_restored(self, model: str, slot: int, tokens: int, seconds: float) -> None:
        self.context_restores.labels(model, "engine").inc()
        self.context_restored_tokens.labels(model, "engine").inc(tokens)
        self.events.emit("context_restored", model, "engine", slot=slot, tokens=tokens,
                         seconds=round(seconds, 2))

    def context_restore_failed(self, model: str, slot: int, reason: str,
                               message: str) -> None:
        self.context_restore_failures.labels(model, "engine", reason).inc()
        self.events.emit("context_restore_failed", model, "engine", slot=slot, reason=reason,
                         message=message)

    def export(self, models: list[dict], system: dict, queues: dict[str, dict],
               peers: list[dict] | None = None,
               workers: list[dict] | None = None) -> web.Response:
        """The text format, with the gauges of this scrape (`models` as /running lists them,
        `system` its memory accounting, `queues` limits' stats by model, `peers` and
        `workers` /running's peer and RPC worker rows)."""
        self.live.now = (models, system, queues)
        self.live.peers, self.live.workers = peers or [], workers or []
        try:
            body = generate_latest(self.registry)
        finally:
            self.live.now, self.live.peers, self.live.workers = ([], {}, {}), [], []
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Live:
    """Gauges read at scrape time: set just before the registry is written out, with nothing
    awaited in between, so concurrent scrapes do not see each other's."""

    def __init__(self) -> None:
        self.now: tuple[list[dict], dict, dict[str, dict]] = ([], {}, {})
        self.peers: list[dict] = []
        self.workers: list[dict] = []

    def describe(self) -> list:
        return []  # the families are only known at scrape time

    def collect(self):
        models, system, queues = self.now
        state = GaugeMetricFamily("model_serve_model_state", "1 for each model a backend "
                                  "holds, by its state (loaded, loading)",
                                  labels=[*MODEL, "state"])
        memory = GaugeMetricFamily("model_serve_model_memory_bytes", "A loaded model's "
                                   "memory: estimated (before loading), measured (its "
                                   "process), reclaimable (mapped weights)",
                                   labels=[*MODEL, "kind"])
        for m in models:
            state.add_metric([m["id"], m["backend"], m["state"]], 1)
            for kind, value in m["memory"].items():
                if value is not None and m["state"] == "loaded":
                    memory.add_metric([m["id"], m["backend"], kind], value)
        queued = GaugeMetricFamily("model_serve_queued", "Requests waiting for a slot "
                                   "(max_concurrent)", labels=MODEL)
        longest = GaugeMetricFamily("model_serve_queue_longest_wait_seconds", "How long the "
                                    "first in the queue has waited", labels=MODEL)
        for mid, stats in queues.items():
            queued.add_metric([mid, "engine"], stats["queued"])
            longest.add_metric([mid, "engine"], stats["longest_queued_seconds"])
        system_memory = GaugeMetricFamily("model_serve_system_memory_bytes", "The system's "
                                          "memory by the governor's accounting",
                                          labels=["kind"])
        for kind in ("total", "used", "available", "limit", "os_used", "models_reclaimable",
                     "reserved"):
            if isinstance(system.get(kind), int):
                system_memory.add_metric([kind], system[kind])
        governor = GaugeMetricFamily("model_serve_governor_up", "1 when the governor answers")
        governor.add_metric([], 1 if system.get("governor") == "up" else 0)
        yield from (state, memory, queued, longest, system_memory, governor)
        yield from self._peers()
        yield from self._workers()

    def _workers(self):
        if not self.workers:
            return
        up = GaugeMetricFamily("model_serve_rpc_worker_up", "1 when an RPC worker a model "
                               "names is held by a loaded model or accepts a connection",
                               labels=["worker"])
        memory = GaugeMetricFamily("model_serve_rpc_worker_memory_bytes", "Resident memory "
                                   "of an RPC worker running on this machine",
                                   labels=["worker"])
        for w in self.workers:
            up.add_metric([w["address"]], 1 if w["up"] else 0)
            if w["memory"] is not None:
                memory.add_metric([w["address"]], w["memory"])
        yield from (up, memory)

    def _peers(self):
        if not self.peers:
            return
        up = GaugeMetricFamily("model_serve_peer_up", "1 when the peer answered its last "
                               "poll", labels=["peer"])
        latency = GaugeMetricFamily("model_serve_peer_latency_seconds", "How long the "
                                    "peer's last poll took", labels=["peer"])
        count = GaugeMetricFamily("model_serve_peer_models", "The peer's models served "
                                  "here (after its filter)", labels=["peer"])
        for p in self.peers:
            up.add_metric([p["name"]], 1 if p["up"] else 0)
            if p["latency_ms"] is not None:
                latency.add_metric([p["name"]], p["latency_ms"] / 1000)
            count.add_metric([p["name"]], len(p["models"]))
        yield from (up, latency, count)
