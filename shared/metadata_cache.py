"""GGUF header metadata cached by path, mtime and size, so rescans cost a stat per file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.files import write_if_possible
from shared.gguf_header import GGUFInfo, read_header

# Bump when GGUFInfo gains a field or is read differently, so older cached headers are
# read again.
VERSION = 4


class MetadataCache:
    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if file and file.is_file():
            try:
                data = json.loads(file.read_text())
                if data.get("version") == VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, ValueError, AttributeError, RecursionError):
                self.entries = {}

    def get(self, path: Path) -> GGUFInfo:
        st = os.stat(path)
        key = str(path)
        stamp = [st.st_mtime_ns, st.st_size]
        hit = self.entries.get(key)
        # an entry of another shape (a damaged file) is read again from the header
        if isinstance(hit, dict) and hit.get("stamp") == stamp and (
                info := GGUFInfo.from_dict(hit.get("info"))):
            return info
        info = read_header(path)
        self.entries[key] = {"stamp": stamp, "info": info.to_dict()}
        self.dirty = True
        return info

    def save(self) -> None:
        if self.file and self.dirty:
            write_if_possible(self.file, json.dumps({"version": VERSION, "entries": self.entries}))
            self.dirty = False
