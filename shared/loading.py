"""Loading one model on the backend that will serve it, with a failure turned into the
error its waiting clients get. The governor loads this way; the proxy too, when the governor
does not answer."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from shared.catalog import Entry
from shared.engines import Engine, EngineError
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
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        # refused, reset or dropped before an answer: an engine starting or stopping (a
        # restart), which a retry finds up; an answer it gave is the engine's error below
        raise LoadError(503, engine.unreachable(), "engine_unavailable") from None
    except (EngineError, aiohttp.ClientError, TimeoutError) as e:
        hint = f" (model file: {entry.path}; the engine log has the details)" if entry else ""
        raise LoadError(500, f"engine: {e}{hint}", "engine_error") from None
