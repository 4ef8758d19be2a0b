"""Loading one model on the backend that will serve it, with a failure turned into the
error its waiting clients get. The governor loads this way; the proxy too, when the governor
does not answer."""

from __future__ import annotations

import asyncio
import re

import aiohttp
from aiohttp import web

from shared.catalog import Entry
from shared.engines import Engine, EngineError
from shared.engines.base import EngineStarting, section_name
from shared.errors import error_response
from shared.ollama import Ollama, OllamaError, OllamaUnavailable

Key = tuple[str, str]  # (backend, name): ("engine", catalog id) or ("ollama", Ollama's name)


class LoadError(Exception):
    """Why a model could not be loaded: an OpenAI-shaped error's status, message, code and
    extra fields, kept as data so that every waiting client gets a response of its own."""

    def __init__(self, status: int, message: str, code: str, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "code": self.code,
                **self.extra}

    def response(self) -> web.Response:
        resp = error_response(self.status, self.message, self.code, **self.extra)
        if self.code == "insufficient_memory":
            # it has already waited LOAD_WAIT, or could never fit: the OpenAI and Anthropic
            # SDKs would otherwise send it twice more, each waiting as long again
            resp.headers["x-should-retry"] = "false"
        return resp

    @classmethod
    def from_dict(cls, data: dict) -> LoadError:
        data = dict(data)
        return cls(int(data.pop("status", 500)), str(data.pop("message", "load failed")),
                   str(data.pop("code", "load_failed")), **data)


async def load(key: Key, entry: Entry | None, engine: Engine, ollama: Ollama,
               session: aiohttp.ClientSession) -> None:
    """Returns once the model is loaded; LoadError otherwise."""
    backend, name = key
    try:
        if backend == "ollama":
            await ollama.load(name, entry)
        elif entry is None:
            raise LoadError(404, f"model {name!r} is not in the catalog", "model_not_found")
        else:
            await engine.load(session, entry)
    except OllamaUnavailable as e:
        raise LoadError(503, str(e), "ollama_unavailable") from None
    except OllamaError as e:
        raise LoadError(e.status if e.status < 500 else 502, f"ollama: {e}",
                        "ollama_error") from None
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, EngineStarting):
        # refused, reset or dropped before an answer, or "Loading model" (503) from a router
        # still starting: an engine starting or stopping (a restart), which a retry finds up;
        # another answer it gave is the engine's error below
        raise LoadError(503, engine.unreachable(), "engine_unavailable") from None
    except (EngineError, aiohttp.ClientError, TimeoutError) as e:
        hint = f" (model file: {entry.path}; the engine log has the details)" if entry else ""
        if entry and (why := await asyncio.to_thread(_why_in_log, engine, entry)):
            hint = f" (model file: {entry.path}; its log says: {why})"
        raise LoadError(500, f"engine: {e}{hint}", "engine_error") from None


_ABORT = re.compile(r"^\S+ \S+ \S+\.(?:c|cpp|h):\d+: (.+)$")


def _error(line: str) -> str | None:
    """The message of an error line: "<date> <time> <llama-server's time> E <message>", or
    ggml's abort before llama-server logs anything ("<date> <time> <source>.cpp:547: Failed
    to connect to <worker>")."""
    parts = line.split(" ", 4)
    if len(parts) == 5 and parts[3] == "E":
        return parts[4]
    return abort[1] if (abort := _ABORT.match(line)) else None


def _why_in_log(engine: Engine, entry: Entry) -> str:
    """The first error lines of the last start in the model's own llama-server log (the
    router's engine writes one per model), e.g. an RPC worker that could not hold its part;
    "" when none."""
    path = engine.settings.state_dir / "logs" / "models" / f"{section_name(entry.id)}.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            lines = f.read().decode(errors="replace").splitlines()[-40:]
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if "llama_server: initializing" in line]
    lines = lines[starts[-1]:] if starts else lines  # this start's lines, not an earlier one's
    # the first errors are the cause, the later ones what followed from it
    errors = [e for line in lines if (e := _error(line))]
    return "; ".join(errors[:2])[:400]
