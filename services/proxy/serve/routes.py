"""The per-model routes the proxy forwards: where each one finds the model's name, what ends
a whole stream, the error shape its clients parse, and which models can answer it."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from shared.model_kinds import EMBEDDING, GENERATE, RERANK

BODY, QUERY, FORM = "body", "query", "form"  # where the request names its model
# the error shape its clients parse
OPENAI, ANTHROPIC, OLLAMA = "openai", "anthropic", "ollama"
# what the last event of a whole stream holds, per API: a stream cut before it is no answer
OPENAI_DONE = b"data: [DONE]"
NATIVE_DONE = b'"stop":true'  # llama-server's own /completion and /infill


@dataclass(frozen=True)
class Route:
    path: str
    method: str = "POST"
    model_in: str = BODY
    stream_end: bytes | tuple[bytes, ...] = OPENAI_DONE  # any of them ends it
    errors: str = OPENAI
    ollama: str | None = None  # Ollama's own route for the same API, which it answers
    needs: str | None = None  # the kind of model the route needs (shared.model_kinds)
    # a list the body must hold: llama-server answers its absence with a 500, which the
    # SDKs would retry
    requires: str | None = None


ROUTES = {route.path: route for route in (
    Route("/v1/chat/completions", needs=GENERATE),
    Route("/v1/completions", needs=GENERATE),
    Route("/v1/embeddings", needs=EMBEDDING),
    Route("/v1/messages", stream_end=b"event: message_stop", errors=ANTHROPIC,
          ollama="/v1/messages", requires="messages", needs=GENERATE),
    Route("/v1/messages/count_tokens", errors=ANTHROPIC, requires="messages"),
    Route("/v1/responses", stream_end=b"event: response.completed", ollama="/v1/responses",
          needs=GENERATE),
    Route("/v1/responses/input_tokens"),
    Route("/v1/chat/completions/input_tokens"),
    *(Route(path, needs=RERANK) for path in ("/v1/rerank", "/rerank", "/v1/reranking")),
    Route("/infill", stream_end=NATIVE_DONE, needs=GENERATE),
    Route("/completion", stream_end=NATIVE_DONE, needs=GENERATE),
    Route("/tokenize"),
    Route("/detokenize"),
    Route("/apply-template"),
    Route("/v1/audio/transcriptions", model_in=FORM),
    *(Route(path, method="GET", model_in=QUERY) for path in ("/props", "/slots", "/metrics")),
)}
# The routes Ollama answers for a model it serves, translated by the proxy (ollama_routes)
OLLAMA_TRANSLATED = ("/v1/chat/completions", "/v1/embeddings")
ANTHROPIC_PATHS = frozenset(path for path, route in ROUTES.items() if route.errors == ANTHROPIC)


def of(request: web.Request) -> Route:
    return ROUTES[request.path]


def ollama_serves(route: Route) -> bool:
    return route.ollama is not None or route.path in OLLAMA_TRANSLATED


def served_by_ollama() -> list[str]:
    """The routes a model Ollama serves answers, for error messages."""
    return [*OLLAMA_TRANSLATED, *(r.path for r in ROUTES.values() if r.ollama)]
