"""Ids that stay put: once a model file has an id, the id keeps pointing at that file.

STATE_DIR/ids.json records id → file (its path relative to MODELS_DIR). A newcomer whose
readable id is taken gets a suffix instead of taking the id over; an id is freed only once
its file is gone, so a re-pull of the same file gets its id back if it is still free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container
from pathlib import Path

from shared.files import write_if_possible


def _load(file: Path) -> dict[str, str]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _fits(mid: str, readable: str) -> bool:
    """Still the id this file would be given (its name, tag and MODEL_PREFIX unchanged)."""
    return mid == readable or mid.startswith(readable + "-")


def _free_id(readable: str, file: str, taken: Container[str]) -> str:
    if readable not in taken:
        return readable
    digest = hashlib.sha1(file.encode()).hexdigest()
    short = f"{readable}-{digest[:6]}"
    return short if short not in taken else f"{readable}-{digest}"


def stable_ids(record_file: Path, wanted: list[tuple[str, str]], present: set[str]) -> list[str]:
    """The id of each (file, readable id) in `wanted`, in order, and the record saved.
    `present`: every file this scan found, readable or not; ids of the others are freed."""
    readable = dict(wanted)
    record: dict[str, str] = {}
    by_file: dict[str, str] = {}
    for mid, file in _load(record_file).items():
        if file in present and file not in by_file and _fits(mid, readable.get(file, mid)):
            record[mid], by_file[file] = file, mid
    ids: list[str] = []
    for file, name in wanted:
        if file not in by_file:
            mid = _free_id(name, file, record)
            record[mid], by_file[file] = file, mid
        ids.append(by_file[file])
    write_if_possible(record_file, json.dumps(record, indent=1, sort_keys=True))
    return ids
