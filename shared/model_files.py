"""Find GGUF model files under a models folder: LM Studio's layout and the bridge's."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lm_studio_ollama_bridge.store import is_gguf

SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass
class ModelFile:
    path: Path  # as found (a symlink stays a symlink, so a re-pull is followed)
    rel: Path
    shards: list[Path] = field(default_factory=list)
    mmproj: Path | None = None

    @property
    def size(self) -> int:
        return sum(_size(p) for p in [self.path, *self.shards])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _utf8(path: Path) -> bool:
    try:
        str(path).encode()
    except UnicodeEncodeError:
        return False
    return True


def is_projector_name(name: str) -> bool:
    return name.lower().startswith("mmproj")


def discover(root: Path) -> tuple[list[ModelFile], list[str]]:
    """Model files (first shard of split models) with their projector, and notices."""
    found: list[ModelFile] = []
    notices: list[str] = []
    if not root.is_dir():
        return found, notices
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:  # removed since it was listed: nothing left to find in it
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []  # a symlink loop
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        ggufs = sorted(f for f in filenames if f.lower().endswith(".gguf"))
        models: list[ModelFile] = []
        projectors: list[Path] = []
        for name in ggufs:
            path = here / name
            if not _utf8(path):
                # the engine's config and catalog.json are UTF-8 text: no way to name it there
                notices.append(f"{str(path)!r}: the path is not valid UTF-8, skipped")
                continue
            if not path.is_file():
                if path.is_symlink():  # else it was removed since it was listed
                    notices.append(f"{path}: broken link, skipped")
                continue
            if not is_gguf(path):
                notices.append(f"{path}: not a GGUF file, skipped")
                continue
            if is_projector_name(name):
                projectors.append(path)
                continue
            shard = SHARD.search(name)
            if shard and int(shard.group(1)) != 1:
                continue
            model = ModelFile(path=path, rel=path.relative_to(root))
            if shard:
                prefix = name[: shard.start()]
                model.shards = [
                    here / f for f in ggufs
                    if f != name and f.startswith(prefix) and SHARD.search(f)
                ]
            models.append(model)
        _pair_projectors(models, projectors)
        found.extend(models)
    return found, notices


def _pair_projectors(models: list[ModelFile], projectors: list[Path]) -> None:
    """`mmproj-<model file name>` belongs to that model (the bridge's naming); otherwise a
    folder's single projector belongs to every model in it (LM Studio's layout)."""
    by_name = {p.name.lower().removeprefix("mmproj-"): p for p in projectors}
    claimed = {p for m in models if (p := by_name.get(m.path.name.lower()))}
    spare = [p for p in projectors if p not in claimed]
    for model in models:
        model.mmproj = by_name.get(model.path.name.lower()) or (
            spare[0] if len(spare) == 1 else None)
