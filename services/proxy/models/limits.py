"""Per-model concurrency: at most `max_concurrent` answers at once (by default its slots),
a bounded queue behind them, first come first served. llama-server would queue without a
bound and hold a connection thread per waiting request; here a waiting request costs
nothing, its wait is visible in /running, and past MAX_QUEUE it is told when to come back
(as Ollama answers 503 past OLLAMA_MAX_QUEUE)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass
class Lane:
    limit: int = 1  # as the catalog said at the latest arrival
    active: int = 0
    waiting: deque[tuple[asyncio.Future[None], float]] = field(default_factory=deque)
    waited_seconds: float = 0.0  # by every request that waited, all told
    answered: int = 0
    answer_seconds: float = 0.0

    def stats(self, now: float) -> dict:
        return {"active": self.active, "queued": len(self.waiting),
                "longest_queued_seconds": round(now - self.waiting[0][1], 3)
                if self.waiting else 0.0,
                "queued_seconds_total": round(self.waited_seconds, 3)}


class Limits:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.lanes: dict[str, Lane] = {}

    @contextlib.asynccontextmanager
    async def slot(self, model_id: str, limit: int):
        """Held while the model answers this request (a stream: until its end). QueueFull
        when the queue is full."""
        lane = self.lanes.setdefault(model_id, Lane())
        lane.limit = limit
        self._admit(lane)  # a raised limit lets waiting requests in first
        if lane.active >= limit or lane.waiting:
            await self._wait(lane)
        else:
            lane.active += 1
        started = time.monotonic()
        try:
            yield
        finally:
            lane.answered += 1
            lane.answer_seconds += time.monotonic() - started
            self._release(lane)

    async def _wait(self, lane: Lane) -> None:
        if len(lane.waiting) >= self.max_queue:
            raise QueueFull(len(lane.waiting), self._retry_after(lane))
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (turn, time.monotonic())
        lane.waiting.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a slot while leaving: pass it on
                self._release(lane)
            elif entry in lane.waiting:
                lane.waiting.remove(entry)
            raise
        finally:
            lane.waited_seconds += time.monotonic() - entry[1]

    def _release(self, lane: Lane) -> None:
        lane.active -= 1
        self._admit(lane)

    @staticmethod
    def _admit(lane: Lane) -> None:
        """Free slots go to the longest waiting requests, so nobody arriving later
        overtakes them."""
        while lane.waiting and lane.active < lane.limit:
            turn, _ = lane.waiting.popleft()
            if not turn.done():  # done: its client left and it is on its way out
                turn.set_result(None)
                lane.active += 1

    @staticmethod
    def _retry_after(lane: Lane) -> int:
        """Seconds until the queue ahead has likely been answered, from the answers so far."""
        if not lane.answered:
            return 1
        mean = lane.answer_seconds / lane.answered
        return max(1, math.ceil(mean * (len(lane.waiting) + 1) / lane.limit))

    def stats(self, model_id: str) -> dict:
        return self.lanes.get(model_id, Lane()).stats(time.monotonic())
