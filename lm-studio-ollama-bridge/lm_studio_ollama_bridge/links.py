"""Plan and make the links, keeping a record so that only links the bridge made are ever
removed or replaced. A file or link someone else put there is never touched."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lm_studio_ollama_bridge.store import DEFAULT_REGISTRY, OllamaModel


@dataclass
class Link:
    target: Path
    names: list[str]


def _part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def plan(models: list[OllamaModel], models_dir: Path) -> dict[Path, Link]:
    """Link path → target. Library models are placed first so they keep the plain names;
    a tag or publisher that would give a taken name to another blob gets a longer one."""
    order = sorted(models, key=lambda m: (m.registry != DEFAULT_REGISTRY
                                          or m.namespace != "library", m.name))
    wanted: dict[Path, Link] = {}
    for m in order:
        folder = models_dir / "ollama" / _part(m.model)
        stem = _part(f"{m.model}-{m.parameter_size}-{m.quantization}")
        for candidate in (stem, f"{stem}-{_part(m.tag)}",
                          f"{stem}-{_part(m.namespace)}-{_part(m.tag)}",
                          f"{stem}-{_part(m.registry)}-{_part(m.namespace)}-{_part(m.tag)}"):
            path = folder / f"{candidate}.gguf"
            if path not in wanted or wanted[path].target == m.blob:
                break
        link = wanted.setdefault(path, Link(m.blob, []))
        link.names += [n for n in m.aliases if n not in link.names]
        if m.projector:
            proj = folder / f"mmproj-{path.stem}.gguf"
            wanted.setdefault(proj, Link(m.projector, []))
    return wanted


@dataclass
class LinkRecord:
    """STATE_DIR's record of what the bridge made: links (target, names) and folders."""

    file: Path
    links: dict[str, dict] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, file: Path) -> LinkRecord:
        try:
            data = json.loads(file.read_text())
            return cls(file, dict(data.get("links", {})), list(data.get("dirs", [])))
        except (OSError, ValueError, AttributeError):
            return cls(file)

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".bridge-")
        with os.fdopen(fd, "w") as f:
            json.dump({"links": self.links, "dirs": self.dirs}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.file)

    def names_by_path(self) -> dict[str, list[str]]:
        return {path: rec.get("names", []) for path, rec in self.links.items()}

    def owns(self, path: Path) -> bool:
        """Ours only while it is still the link we made, pointing where we pointed it."""
        rec = self.links.get(str(path))
        return bool(rec) and path.is_symlink() and os.readlink(path) == rec["target"]


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.replaced or self.removed)

    def lines(self, dry_run: bool = False) -> list[str]:
        verb = "would " if dry_run else ""
        return ([f"{verb}link    {p}" for p in self.created]
                + [f"{verb}relink  {p}" for p in self.replaced]
                + [f"{verb}remove  {p}" for p in self.removed]
                + [f"note: {n}" for n in self.notices])


class Bridge:
    def __init__(self, models_dir: Path, record_file: Path) -> None:
        self.models_dir = models_dir
        self.record_file = record_file

    def sync(self, models: list[OllamaModel], dry_run: bool = False) -> SyncReport:
        record = LinkRecord.load(self.record_file)
        wanted = plan(models, self.models_dir)
        report = SyncReport()
        for key in list(record.links):
            path = Path(key)
            link = wanted.get(path)
            if link and str(link.target) == record.links[key]["target"]:
                continue
            if not record.owns(path):
                del record.links[key]  # changed by someone else since: no longer ours
                continue
            if link is None:
                report.removed.append(key)
                if not dry_run:
                    path.unlink()
                    del record.links[key]
        for path, link in sorted(wanted.items()):
            key, target = str(path), str(link.target)
            if path.is_symlink() or path.exists():
                if not record.owns(path):
                    report.notices.append(f"{path} exists and was not made by the bridge; "
                                          "left as it is")
                    continue
                if os.readlink(path) == target:
                    report.kept.append(key)
                else:
                    report.replaced.append(key)
                    if not dry_run:
                        path.unlink()
                        path.symlink_to(target)
            else:
                report.created.append(key)
                if not dry_run:
                    self._make_dirs(path.parent, record)
                    path.symlink_to(target)
            if not dry_run:
                record.links[key] = {"target": target, "names": link.names}
        if not dry_run:
            self._remove_empty_dirs(record)
            record.save()
        return report

    def _make_dirs(self, folder: Path, record: LinkRecord) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            record.dirs.append(str(d))

    def _remove_empty_dirs(self, record: LinkRecord) -> None:
        for d in sorted(record.dirs, key=len, reverse=True):
            path = Path(d)
            try:
                path.rmdir()  # only succeeds when empty
            except FileNotFoundError:
                pass
            except OSError:
                continue
            record.dirs.remove(d)
