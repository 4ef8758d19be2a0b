"""Memory decisions for a load: what the machine has left, which idle models could make
room, and the numbers a refusal gives. Plain functions over /running's rows (the owner
decides with them; the governor's policy uses the same ones)."""

from __future__ import annotations

import time

from shared.loading import LoadError
from shared.memory import Accounting

GIB = 1024**3


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 1024**2:.0f} MiB"


def measured(row: dict) -> int:
    return row["memory"]["measured"] or 0


def held(row: dict) -> int:
    """What admission counts a loaded model as: its memory now, or what it may grow to."""
    return max(measured(row), row["memory"]["estimated"] or 0)


def growth(rows: list[dict], skip: set | frozenset = frozenset()) -> int:
    """What loaded models may still grow by before they reach their estimates (KV pages
    and prompt caches their conversations have yet to fill); `skip`: (backend, name) of
    models whose memory a load reservation already counts."""
    return sum(held(r) - measured(r) for r in rows
               if r["state"] == "loaded" and (r["backend"], r["name"]) not in skip)


def idle_lru(rows: list[dict], min_age: float, leaving: set[str] | frozenset = frozenset()
             ) -> list[dict]:
    """Models that may leave now, least recently used first: loaded, no request in flight,
    not pinned, not already leaving, unused for at least `min_age` seconds (which also
    spares a model loaded a moment ago for a request still on its way to it). A model whose
    context would have to be prefilled again (no saved context restores it) counts as used
    that many seconds later."""
    now = time.time()
    return sorted((r for r in rows
                   if r["state"] == "loaded" and not r["in_flight"] and not r["pinned"]
                   and r["id"] not in leaving and r["last_used"] is not None
                   and now - r["last_used"] >= min_age),
                  key=lambda r: r["last_used"] + (r.get("reload") or {}).get("prefill", 0))


def others(acct: Accounting, rows: list[dict]) -> int:
    """What other programs hold: used memory that is neither a model's nor reserved."""
    return max(0, acct.used - acct.reserved - acct.growth - sum(measured(r) for r in rows))


def never_fits(need: int, acct: Accounting, rows: list[dict]) -> bool:
    """Whether the load could not fit even with every unpinned model gone."""
    movable = sum(measured(r) for r in rows if not r["pinned"])
    pinned_growth = growth([r for r in rows if r["pinned"]])
    return need > acct.room + movable + acct.reserved + acct.growth - pinned_growth


def refusal(model: str, need: int, acct: Accounting, rows: list[dict], why: str) -> LoadError:
    held = others(acct, rows)
    return LoadError(
        503, f"not enough memory to load {model}: it needs about {size(need)}, "
        f"{size(max(acct.room, 0))} is free under the {acct.threshold_pct:g}% limit "
        f"({size(acct.limit)}); other programs hold {size(held)}; {why}",
        "insufficient_memory", needed=need, available=max(acct.room, 0), other_programs=held,
        busy=[r["id"] for r in rows if r["in_flight"]],
        pinned=[r["id"] for r in rows if r["pinned"]])


def holding(rows: list[dict], min_age: float) -> str:
    """Which models hold memory and cannot leave yet, for a load that waits."""
    now = time.time()
    kinds = {"busy": [r["id"] for r in rows if r["in_flight"]],
             "pinned": [r["id"] for r in rows if r["pinned"]],
             "used moments ago": [r["id"] for r in rows if r["state"] == "loaded"
                                  and not r["in_flight"] and not r["pinned"]
                                  and r["last_used"] and now - r["last_used"] < min_age]}
    said = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items() if v)
    return said or "models leaving"
