"""Links in STATE_DIR/model-links to model files whose path an engine's config cannot hold
(llama-server's preset file ends a value at `;` or `#`). The folder holds nothing but these
links, which the project makes and removes; the files they point at are never touched."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from shared.model_files import SHARD

FOLDER = "model-links"
_UNSAFE = re.compile(r"[;#\x00-\x1f\x7f]")


def link_path(state_dir: Path, target: str) -> Path:
    """Where the link to `target` is: a folder of its own, named after the whole path, so
    that two files of one name never share a link."""
    digest = hashlib.sha1(target.encode()).hexdigest()[:16]
    return state_dir / FOLDER / digest / _UNSAFE.sub("_", Path(target).name)


def links_to(state_dir: Path, target: str) -> dict[Path, str]:
    """Link → file for `target` and, when it is the first shard of a split model, for the
    other shards: llama-server finds them by name beside the first."""
    link, name = link_path(state_dir, target), Path(target).name
    wanted = {link: target}
    shard = SHARD.search(name)
    if shard and int(shard[1]) == 1:
        for n in range(2, int(shard[2]) + 1):
            other = f"{name[:shard.start()]}-{n:05d}-of-{shard[2]}{name[-5:]}"
            wanted[link.with_name(_UNSAFE.sub("_", other))] = str(Path(target).with_name(other))
    return wanted


def keep(state_dir: Path, wanted: dict[Path, str]) -> None:
    """Makes the wanted links and removes every other link in the folder."""
    for link, target in wanted.items():
        if link.is_symlink() and os.readlink(link) == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        made = link.with_name(f".{link.name}.new")
        made.unlink(missing_ok=True)
        os.symlink(target, made)
        os.replace(made, link)  # a model loading meanwhile sees the old link or the new one
    root = state_dir / FOLDER
    for folder in root.iterdir() if root.is_dir() else []:
        for item in folder.iterdir() if folder.is_dir() else []:
            if item.is_symlink() and item not in wanted:
                item.unlink()
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
