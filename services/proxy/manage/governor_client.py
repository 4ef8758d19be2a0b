"""The governor as the proxy sees it: its /health, asked with a short timeout."""

from __future__ import annotations

import aiohttp

from shared.settings import Settings


async def governor_health(session: aiohttp.ClientSession, settings: Settings,
                          timeout: float = 1.0) -> dict | None:
    """The governor's /health, or None when it does not answer in time."""
    try:
        async with session.get(settings.governor_url + "/health",
                               timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
