"""Requests held while the engine takes up a config that stops every model it runs
(llama-swap's reload does): the sync asks for the hold (POST /engine/hold, manage/models.py) before
it writes the config. New requests for the engine's models wait; those under way get
DRAIN_SECONDS to finish, as on a proxy restart. The hold lasts while the sync keeps that
request open: it writes the config, waits until the engine serves it, and closes the request
(or dies, which closes it too). Then the proxy looks at the engine again, so the models the
reload stopped are cold and load through admission, and the waiting requests go on."""

from __future__ import annotations

import asyncio
import contextlib

# a sync holding requests longer than this has hung: they go on without it
LONGEST_HOLD = 120.0


class Hold:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._inside = 0  # requests past the gate
        self._idle = asyncio.Event()
        self._idle.set()
        self._one = asyncio.Lock()
        # the hold is for the engine service stopping (its models with it), not for a config
        self.stopping = False

    @property
    def holding(self) -> bool:
        return not self._open.is_set()

    @property
    def under_way(self) -> int:
        return self._inside

    async def until_open(self) -> None:
        """Until no hold is on; a hold ends when its sync closes it, within LONGEST_HOLD."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LONGEST_HOLD):
                await self._open.wait()

    @contextlib.asynccontextmanager
    async def passage(self):
        """Around all a request does with an engine model: its load, its wait in the model's
        queue and its answer."""
        await self._open.wait()
        self._inside += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if not self._inside:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def held(self, drain: float, stopping: bool = False):
        """New requests wait at the gate; yields once those inside have finished, or after
        `drain` seconds with how many have not."""
        async with self._one:
            self._open.clear()
            self.stopping = stopping
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(drain):
                        await self._idle.wait()
                yield self._inside
            finally:
                self._open.set()
