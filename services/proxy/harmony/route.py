"""Chat with a GPT-OSS model through Harmony: render the prompt, stream the engine's raw
completion tokens, and answer as any other OpenAI chat model would."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from services.proxy.apis.openai_shapes import Completion
from services.proxy.context import CTX
from services.proxy.harmony.constraints import (
    CALL,
    Constraints,
    call_of,
    choice_grammar,
    constraints,
    logit_bias,
)
from services.proxy.harmony.decode import HarmonyDecoder
from services.proxy.harmony.encode import RequestError, prompt_tokens
from services.proxy.serve import upstream
from services.proxy.serve.engine_errors import engine_error
from shared.catalog import Entry
from shared.errors import error_response, stream_error

# OpenAI field → llama-server /completion field; the rest of the samplers share their names.
_RENAMED = {"max_tokens": "n_predict", "max_completion_tokens": "n_predict"}
_SAMPLERS = ("temperature", "top_p", "top_k", "min_p", "seed", "top_n_sigma", "typical_p",
             "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n",
             "xtc_probability", "xtc_threshold", "dry_multiplier", "mirostat")


def completion_body(payload: dict, entry: Entry, tokens: list[int],
                    limits: Constraints) -> dict:
    # No stop strings for <|return|> and <|call|>: those tokens end generation anyway and
    # render as no text, so the strings would only cut answers that mention them.
    body: dict = {"model": entry.id, "prompt": tokens + limits.prefill, "stream": True,
                  "return_tokens": True, "cache_prompt": True, **limits.fields}
    for name in _SAMPLERS:
        if payload.get(name) is not None:
            body[name] = payload[name]
    for name, renamed in _RENAMED.items():
        if payload.get(name) is not None:
            body[renamed] = payload[name]
    if bias := logit_bias(payload, limits.end):
        body["logit_bias"] = bias
    if stop := payload.get("stop"):
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return body


def _post(ctx, entry: Entry, body: dict):
    return upstream.post(ctx, entry, "/completion", ctx.engine.completion_url(entry),
                         body["stream"], headers=ctx.engine.headers, json=body)


def finish_reason(decoder: HarmonyDecoder, stop_type: str) -> str:
    """`length` first: a call cut by max_tokens has arguments that are not whole."""
    if stop_type == "limit" and not decoder.stopped:
        return "length"
    return "tool_calls" if decoder.calls else "stop"


async def chat(request: web.Request, payload: dict, entry: Entry) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        tokens = await asyncio.to_thread(prompt_tokens, payload, entry.reasoning_effort
                                         or "medium")
        limits = constraints(payload)
    except RequestError as e:
        return error_response(400, str(e), "invalid_request")
    if limits.choose:
        try:
            limits = call_of(await _chosen_tool(ctx, entry, tokens, limits.choose))
        except (aiohttp.ClientError, ValueError) as e:
            return error_response(502, f"engine: choosing the tool to call failed: {e}",
                                  "engine_error")
    decoder = HarmonyDecoder()
    decoder.feed(limits.prefill)  # the answer's start, written for the model: no text
    chunks = Completion(payload["model"])
    streaming = bool(payload.get("stream"))
    usage = {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}
    stop_type = ""
    resp: web.StreamResponse | None = None
    cut: str | None = "the engine ended the answer before it was complete"
    failed: dict | str | None = None
    try:
        async with await _post(ctx, entry, completion_body(payload, entry, tokens,
                                                           limits)) as up:
            if up.status >= 400:
                return await engine_error(up, entry.path)
            if streaming:
                resp = web.StreamResponse()
                resp.content_type = "text/event-stream"
                await resp.prepare(request)
                await resp.write(chunks.chunk({"role": "assistant"}))
            async for line in up.content:
                if not line.startswith(b"data: "):
                    continue
                item = json.loads(line[6:])
                if item.get("error"):  # the engine failed mid-answer: say so, never "stop"
                    failed = item["error"]
                    break
                received = item.get("tokens") or []
                # counted here too: a stop token ends the read before the engine's totals
                usage["completion_tokens"] += len(received)
                deltas = decoder.feed(received)
                if item.get("stop"):
                    stop_type = item.get("stop_type", "")
                    usage["prompt_tokens"] = item.get("tokens_evaluated", len(tokens))
                    usage["completion_tokens"] = item.get("tokens_predicted",
                                                          usage["completion_tokens"])
                if resp is not None:
                    for delta in deltas:
                        await resp.write(chunks.chunk(delta))
                if decoder.stopped or item.get("stop"):
                    cut = None
                    break  # leaving the block closes the upstream: generation stops
    except aiohttp.ClientConnectorError:
        if resp is None:
            return error_response(503, ctx.engine.unreachable(), "engine_unavailable")
    except (aiohttp.ClientError, ValueError) as e:
        if upstream.the_client_left(request):  # its write failed, not the model's read
            raise asyncio.CancelledError from None
        cut = f"the connection to the engine broke mid-answer ({e})"
    if failed is not None:
        message = failed.get("message") if isinstance(failed, dict) else str(failed)
        status = failed.get("code") if isinstance(failed, dict) else 500
        status = status if isinstance(status, int) and 400 <= status < 600 else 500
        if resp is None:
            return error_response(status, f"engine: {message}", "engine_error")
        await resp.write(stream_error(f"engine: {message}", "engine_error"))
        await resp.write_eof()
        return resp
    if cut:
        cut += f"; {entry.id} may have crashed: `model logs engine` says why"
        if resp is None:
            return error_response(502, cut, "engine_error")
        await resp.write(stream_error(cut))
        await resp.write_eof()
        return resp
    tail = decoder.finish()
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    finish = finish_reason(decoder, stop_type)
    if resp is None:
        return web.json_response(chunks.whole(_message(decoder), finish, usage))
    for delta in tail:
        await resp.write(chunks.chunk(delta))
    await resp.write(chunks.chunk({}, finish, usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _chosen_tool(ctx, entry: Entry, tokens: list[int], tools: list[dict]) -> dict:
    """The function a required call goes to, when the model may pick among several: a short
    completion writes only the call's header (the prompt is then cached for the call)."""
    body = {"model": entry.id, "prompt": tokens, "grammar": choice_grammar(tools), "n_predict": 32,
            "stream": False, "cache_prompt": True, "logit_bias": logit_bias({}, CALL)}
    async with await _post(ctx, entry, body) as up:
        if up.status >= 400:
            raise ValueError(f"HTTP {up.status}: {(await up.text())[:300]}")
        written = (await up.json()).get("content", "")
    name = written.rpartition("functions.")[2].strip()
    return next((t for t in tools if t["name"] == name), tools[0])


def _message(decoder: HarmonyDecoder) -> dict:
    result = decoder.result
    message: dict = {"role": "assistant", "content": result.content or None}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    return message
