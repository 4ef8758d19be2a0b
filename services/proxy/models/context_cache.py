"""A model's conversations kept across its leaving. Before the owner unloads a llama-server
model for a planned reason (TTL, memory, admission, `model unload`, a stack stop), llama-server
writes each of its slots' KV cache to CONTEXT_CACHE_DIR itself (`--slot-save-path`, `POST
/slots/<id>?action=save`); after its next load, before the first request goes through, it
reads them back (`action=restore`). A restore must prove itself: a request of the saved tokens
must find them in the slot's cache (`timings.cache_n`), as it does not for architectures whose
cache cannot be restored (sliding-window and hybrid models); otherwise the slot is emptied,
the file dropped and the next request prefilled as usual.

Files are named by a digest of the model's file and every option that shapes its cache, so
a changed model never gets another's cache. The folder is kept within CONTEXT_CACHE_GB, least
recently used first; files that match no model of the catalog any more are removed; nothing
there not named as these files are is touched."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from services.proxy.manage.metrics import Metrics
from shared.catalog import SLOT_SAVE_FLAG, Catalog, Entry
from shared.memory import CACHE_RAM_FLAGS
from shared.settings import Settings

log = logging.getLogger("model-serve.proxy")

NAME = re.compile(r"^([0-9a-f]{20})-slot(\d+)\.bin$")
MAGIC = 0x67677371  # llama.cpp's sequence state file: 'ggsq', its version, a token list
SAVE_SECONDS = 120.0  # one slot of a long context on a big model: gigabytes to write
RESTORE_SECONDS = 120.0
ASK_SECONDS = 5.0  # the slot list
# options that leave the cache as it is; every other one counts (a changed RoPE, cache type
# or context makes a saved cache wrong for the model)
NOT_SHAPING = (*CACHE_RAM_FLAGS, SLOT_SAVE_FLAG)
PROVEN = 0.9  # a restore counts when the next request finds this share of it cached


def digest(entry: Entry) -> str | None:
    """What a saved cache is valid for: the model's file as it is now, its context, its
    slots and its options. None when the file cannot be read."""
    try:
        st = os.stat(entry.path)
    except OSError:
        return None
    options = [o for o in entry.options if o[0] not in NOT_SHAPING]
    text = json.dumps([os.path.realpath(entry.path), st.st_size, st.st_mtime_ns,
                       entry.ctx_size, entry.parallel, options])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def saved_tokens(path: Path, count_only: bool = False) -> list[int] | int | None:
    """The tokens a saved slot holds (or their count), from its header; None when it is not
    such a file. llama-server writes its own record in the file's token list: -1, its
    version, the count, the tokens (and what else it keeps); older ones, the tokens alone."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 12:
                return None
            magic, _version, count = struct.unpack("<III", head[:12])
            if magic != MAGIC:
                return None
            wrapped = len(head) == 24 and struct.unpack("<iii", head[12:])[0] == -1
            if wrapped:
                count = struct.unpack("<i", head[20:24])[0]
            if count_only or count < 0:
                return count if count >= 0 else None
            f.seek(24 if wrapped else 12)
            data = f.read(4 * count)
    except OSError:
        return None
    return list(struct.unpack(f"<{count}i", data)) if len(data) == 4 * count else None


@dataclass(frozen=True)
class Saved:
    path: Path
    digest: str
    slot: int
    bytes: int
    at: float  # last saved or restored: the folder's LRU order


class ContextCache:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession, metrics: Metrics,
                 headers: dict[str, str]) -> None:
        self.dir = settings.context_cache_dir
        self.budget = settings.context_cache_bytes
        self.session, self.metrics = session, metrics
        self.headers = headers  # the engine's key, which its models' servers ask for

    def kept_for(self, entry: Entry | None) -> bool:
        """Whether this model's slots are saved here: the feature is on, and its llama-server
        writes to this folder (custom_models.yaml may give it a folder of its own)."""
        return bool(self.budget and entry and entry.backend == "engine" and any(
            o[0] == SLOT_SAVE_FLAG and o[1:] == [str(self.dir)] for o in entry.options))

    def files(self) -> list[Saved]:
        out = []
        with contextlib.suppress(OSError):
            for item in os.scandir(self.dir):
                if (m := NAME.match(item.name)) and item.is_file(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                    out.append(Saved(Path(item.path), m[1], int(m[2]), st.st_size,
                                     st.st_mtime))
        return out

    # ---- save, before a planned leaving ---------------------------------------------------

    async def save(self, model: str, entry: Entry | None, base: str | None,
                   catalog: Catalog) -> None:
        """Each slot that holds a prompt, written by the model's own llama-server at `base`.
        Bounded; a failure is logged and the unload goes on."""
        if not (self.kept_for(entry) and base) or entry is None:
            return
        key = await asyncio.to_thread(digest, entry)
        if key is None:
            return
        try:
            await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
            for slot in await self._slots(base):
                await self._save_slot(model, base, key, slot)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            log.warning("could not save %s's context: %s", model, str(e) or type(e).__name__)
        await asyncio.to_thread(self.tidy, catalog)

    async def _slots(self, base: str) -> list[int]:
        async with asyncio.timeout(ASK_SECONDS):
            async with self.session.get(base + "/slots", headers=self.headers) as r:
                r.raise_for_status()
                return [int(s["id"]) for s in await r.json()]

    async def _save_slot(self, model: str, base: str, key: str, slot: int) -> None:
        name = f"{key}-slot{slot}.bin"
        began = time.monotonic()
        async with asyncio.timeout(SAVE_SECONDS):
            async with self.session.post(f"{base}/slots/{slot}", params={"action": "save"},
                                         json={"filename": name}, headers=self.headers) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    raise ValueError(f"slot {slot}: {r.status} {_message(answer)}")
        path = self.dir / name
        tokens = int(answer.get("n_saved") or 0)
        if not tokens:  # an empty slot: no file is worth keeping for it
            path.unlink(missing_ok=True)
            return
        size = int(answer.get("n_written") or 0)
        self.metrics.context_saved(model, slot, tokens, size, time.monotonic() - began)
        log.info("saved %s's slot %d: %d tokens, %.1f MiB", model, slot, tokens, size / 2**20)

    # ---- restore, after a load ------------------------------------------------------------

    async def restore(self, model: str, entry: Entry | None, base: str | None) -> None:
        """Each saved slot of this model read back into its llama-server at `base`, and
        proven; never raises: a request that finds no restored cache is prefilled."""
        if not (self.kept_for(entry) and base) or entry is None:
            return
        key = await asyncio.to_thread(digest, entry)
        mine = [s for s in await asyncio.to_thread(self.files) if s.digest == key]
        if not mine:
            return
        try:
            slots = set(await self._slots(base))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
            log.warning("could not restore %s's context: %s", model, str(e) or type(e).__name__)
            return
        for saved in mine:
            if saved.slot in slots:
                await self._restore_slot(model, base, saved)

    async def _restore_slot(self, model: str, base: str, saved: Saved) -> None:
        began = time.monotonic()
        try:
            tokens = await asyncio.to_thread(saved_tokens, saved.path)
            if not tokens:
                raise Refused("not a slot llama-server saved (unreadable header)")
            async with asyncio.timeout(RESTORE_SECONDS):
                async with self.session.post(
                        f"{base}/slots/{saved.slot}", params={"action": "restore"},
                        json={"filename": saved.path.name}, headers=self.headers) as r:
                    answer = await r.json(content_type=None)
                    if r.status != 200:
                        raise Refused(_message(answer))
                cached = await self._cached(base, saved.slot, tokens)
            if cached < PROVEN * (len(tokens) - 1):
                await self._erase(base, saved.slot)
                raise Refused(f"the model did not take it up (cache_n {cached} of "
                              f"{len(tokens)} tokens): its architecture cannot restore a "
                              "saved cache", "not_in_cache")
        except Refused as e:
            await asyncio.to_thread(saved.path.unlink, missing_ok=True)
            self.metrics.context_restore_failed(model, saved.slot, e.reason, str(e))
            log.warning("deleted %s's saved slot %d (%s): %s; the conversation is read "
                        "again in full", model, saved.slot, saved.path.name, e)
            return
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            self.metrics.context_restore_failed(model, saved.slot, "error",
                                                str(e) or type(e).__name__)
            log.warning("could not restore %s's slot %d: %s", model, saved.slot,
                        str(e) or type(e).__name__)
            return
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.utime, saved.path)  # recently used: kept longest
        self.metrics.context_restored(model, saved.slot, len(tokens),
                                      time.monotonic() - began)
        log.info("restored %s's slot %d: %d tokens", model, saved.slot, len(tokens))

    async def _cached(self, base: str, slot: int, tokens: list[int]) -> int:
        """How much of `tokens` the slot finds in its cache: a request of them, which
        evaluates only the last one when the restore holds."""
        probe = {"prompt": tokens, "n_predict": 0, "id_slot": slot, "cache_prompt": True}
        async with self.session.post(base + "/completion", json=probe,
                                     headers=self.headers) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                raise Refused(_message(answer))
        return int((answer.get("timings") or {}).get("cache_n") or 0)

    async def _erase(self, base: str, slot: int) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(ASK_SECONDS):
                async with self.session.post(f"{base}/slots/{slot}",
                                             params={"action": "erase"},
                                             headers=self.headers) as r:
                    await r.read()

    # ---- the folder -----------------------------------------------------------------------

    def tidy(self, catalog: Catalog) -> None:
        """Removes the files of no model of `catalog` as it is now, then the least recently
        used until the folder is within its budget. Turned off (CONTEXT_CACHE_GB=0), it
        leaves what is saved as it is, for when it is turned on again."""
        if not self.budget:
            return
        valid = {d for e in catalog.entries.values() if self.kept_for(e)
                 if (d := digest(e))}
        files = self.files()
        if valid:  # an empty catalog (a models folder not mounted yet) judges nothing
            for saved in [s for s in files if s.digest not in valid]:
                _remove(saved, "its model changed or left the catalog")
            files = [s for s in files if s.digest in valid]
        files.sort(key=lambda s: s.at)
        held = sum(s.bytes for s in files)
        for saved in files:
            if held <= self.budget:
                break
            _remove(saved, f"the folder is over CONTEXT_CACHE_GB ({self.budget / 2**30:g})")
            held -= saved.bytes

    def state(self, catalog: Catalog) -> dict:
        """/running's `contexts`: the folder, its budget and use, and each model's saved
        context (tokens, bytes, when last saved or restored)."""
        by_digest: dict[str, list[str]] = {}
        for e in catalog.entries.values():
            if self.kept_for(e) and (d := digest(e)):
                by_digest.setdefault(d, []).append(e.id)  # aliases of one file share it
        files = self.files()
        models: dict[str, dict] = {}
        for saved in files:
            tokens = saved_tokens(saved.path, count_only=True) or 0
            for model in by_digest.get(saved.digest, []):
                row = models.setdefault(model, {"tokens": 0, "bytes": 0, "saved_at": 0.0})
                row["tokens"] += tokens
                row["bytes"] += saved.bytes
                row["saved_at"] = max(row["saved_at"], saved.at)
        return {"dir": str(self.dir), "budget": self.budget,
                "used": sum(s.bytes for s in files), "models": models}


class Refused(Exception):
    """The model's llama-server would not take the saved slot up."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


def _message(answer: object) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error.get("message") if isinstance(error, dict) else error or answer)


def _remove(saved: Saved, why: str) -> None:
    with contextlib.suppress(OSError):
        saved.path.unlink()
        log.info("removed saved context %s: %s", saved.path.name, why)
