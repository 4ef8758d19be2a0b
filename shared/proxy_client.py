"""The proxy's management API, for the governor and the CLI."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp

from shared.engine_key import HEADER

# what the proxy spends saving its engine models' contexts in a hold, before its answer's line
HOLD_SAVE_SECONDS = 60.0


class ProxyError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ProxyClient:
    def __init__(self, base: str, session: aiohttp.ClientSession, api_key: str = "",
                 stack_key: str = "") -> None:
        """`stack_key`: the engine key, which only the stack's own processes (the governor)
        can read; the proxy takes an unload's reason only with it."""
        self.base, self.session = base, session
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if stack_key:
            self.headers[HEADER] = stack_key

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        async with self.session.request(method, self.base + path, json=body,
                                        headers=self.headers) as r:
            text = await r.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if r.status >= 400 or not isinstance(data, dict):
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and error.get("message"):
                raise ProxyError(r.status, str(error["message"]))
            raise ProxyError(r.status, f"{method} {path}: HTTP {r.status}: {text.strip()[:300]}")
        return data

    async def running(self) -> dict:
        return await self._call("GET", "/running")

    async def events(self) -> dict:
        """The recent loads, unloads and refusals (the dashboard gets them live)."""
        return await self._call("GET", "/events")

    async def unload(self, model: str, force: bool = False, backend: str | None = None,
                     reason: str | None = None, detail: str = "", signal: str = "",
                     idle_at_least: float | None = None) -> dict:
        """`reason`: the governor's cause, which it logs itself; the proxy takes it (and
        `detail` and `signal`, the OS signals that fired, for the metrics and the dashboard's
        events) only with the stack key, and logs any other unload as a client's request.
        `idle_at_least`: the proxy refuses (409) when the model was used more recently than
        that, since the decision was made on an older reading."""
        body = {"model": model, "force": force, **({"backend": backend} if backend else {}),
                **({"reason": reason, "detail": detail, "signal": signal} if reason else {}),
                **({"idle_at_least": idle_at_least} if idle_at_least is not None else {})}
        return await self._call("POST", "/models/unload", body)

    async def load(self, model: str) -> dict:
        return await self._call("POST", "/models/load", {"model": model})

    @contextlib.asynccontextmanager
    async def engine_held(self, drain_seconds: float, stop: bool = False
                          ) -> AsyncIterator[None]:
        """The proxy holds new requests for the engine's models while this lasts; entered
        once those under way have finished (or had DRAIN_SECONDS) and the models' contexts
        are saved. `stop`: the engine service is stopping. Needs the stack key."""
        async with self.session.post(self.base + "/engine/hold", headers=self.headers,
                                     params={"why": "stop"} if stop else None,
                                     timeout=aiohttp.ClientTimeout(
                                         total=None, sock_connect=5,
                                         sock_read=drain_seconds + HOLD_SAVE_SECONDS
                                         + 10)) as r:
            if r.status != 200:
                raise ProxyError(r.status, f"POST /engine/hold: HTTP {r.status}: "
                                 f"{(await r.text()).strip()[:300]}")
            if not await r.content.readline():  # its line comes once they have finished
                raise ProxyError(r.status, "POST /engine/hold: closed unanswered")
            try:
                yield
            finally:
                r.close()  # the proxy lets them go on
