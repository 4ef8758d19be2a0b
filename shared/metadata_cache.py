"""GGUF header metadata cached by path, mtime and size, so rescans cost a stat per file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.files import write_atomic
from shared.gguf_header import GGUFInfo, read_header

# Bump when GGUFInfo gains a field, so older cached headers are read again.
VERSION = 3


class MetadataCache:
    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if file and file.is_file():
            try:
                data = json.loads(file.read_text())
                if data.get("version") == VERSION:
                    self.entries = data["entries"]
            except (OSError, ValueError, AttributeError, KeyError):
                self.entries = {}

    def get(self, path: Path) -> GGUFInfo:
        st = os.stat(path)
        key = str(path)
        stamp = [st.st_mtime_ns, st.st_size]
        hit = self.entries.get(key)
        if hit and hit.get("stamp") == stamp:
            return GGUFInfo(**hit["info"])
        info = read_header(path)
        self.entries[key] = {"stamp": stamp, "info": info.to_dict()}
        self.dirty = True
        return info

    def save(self) -> None:
        if self.file and self.dirty:
            write_atomic(self.file, json.dumps({"version": VERSION, "entries": self.entries}))
            self.dirty = False
