"""Plan and make the links, keeping a record so that only links the bridge made are ever
removed or replaced. A file or link someone else put there is never touched."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lm_studio_ollama_bridge.lock import locked
from lm_studio_ollama_bridge.store import DEFAULT_REGISTRY, OllamaModel, listed_names


@dataclass
class Link:
    target: Path
    names: list[str]


def _part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def plan(models: list[OllamaModel], models_dir: Path,
         linked: dict[str, str] | None = None) -> dict[Path, Link]:
    """Link path → target. Library models are placed first so they keep the plain names;
    a tag or publisher that would give a taken name to another blob gets a longer one. A
    blob is linked once: every name Ollama has it under (`ollama cp` to another name too) is
    one of that link's names. `linked` (target → link path, as recorded) keeps a blob's
    link where it is when a name is added to it."""
    linked = linked or {}

    def _folder(m: OllamaModel) -> Path:
        return models_dir / "ollama" / _part(m.model)

    order = sorted(models, key=lambda m: (
        m.registry != DEFAULT_REGISTRY or m.namespace != "library",
        Path(linked.get(str(m.blob), "/")).parent != _folder(m), m.name))
    wanted: dict[Path, Link] = {}
    by_blob: dict[Path, Path] = {}
    for m in order:
        if (path := by_blob.get(m.blob)) is None:
            stem = _part(f"{m.model}-{m.parameter_size}-{m.quantization}")
            for candidate in (stem, f"{stem}-{_part(m.tag)}",
                              f"{stem}-{_part(m.namespace)}-{_part(m.tag)}",
                              f"{stem}-{_part(m.registry)}-{_part(m.namespace)}-"
                              f"{_part(m.tag)}"):
                path = _folder(m) / f"{candidate}.gguf"
                if path not in wanted or wanted[path].target == m.blob:
                    break
            by_blob[m.blob] = path
        link = wanted.setdefault(path, Link(m.blob, []))
        link.names += [n for n in m.aliases if n not in link.names]
        if m.projector:
            proj = path.parent / f"mmproj-{path.stem}.gguf"
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
        """What a damaged record holds of another shape is dropped: links it named are then
        left alone, as if someone else had made them."""
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError, RecursionError):
            return cls(file)
        if not isinstance(data, dict):
            return cls(file)
        links, dirs = data.get("links"), data.get("dirs")
        return cls(file,
                   {k: rec for k, v in links.items() if (rec := _link(v))}
                   if isinstance(links, dict) else {},
                   [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else [])

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".bridge-")
        with os.fdopen(fd, "w") as f:
            json.dump({"links": self.links, "dirs": self.dirs}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.file)

    def names_by_path(self) -> dict[str, list[str]]:
        return {path: rec.get("names", []) for path, rec in self.links.items()}

    def tags_by_path(self) -> dict[str, list[str]]:
        """Each link's Ollama names as `ollama list` shows them: every tag of the blob."""
        return {path: listed_names(names) for path, names in self.names_by_path().items()}

    def owns(self, path: Path) -> bool:
        """Ours only while it is still the link we made, pointing where we pointed it."""
        rec = self.links.get(str(path))
        try:
            return bool(rec) and os.readlink(path) == rec["target"]
        except OSError:  # not a link, or gone
            return False


def _link(rec: object) -> dict | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("target"), str):
        return None
    names = rec.get("names")
    return {"target": rec["target"],
            "names": [n for n in names if isinstance(n, str)] if isinstance(names, list) else []}


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
        """One sync at a time (the record is read, changed and written whole); the record
        is saved whatever fails, so a link made is never forgotten and left behind."""
        recorded = LinkRecord.load(self.record_file).links
        wanted = plan(models, self.models_dir,
                      {rec["target"]: path for path, rec in recorded.items()})
        report = SyncReport()
        if dry_run:
            self._sync(LinkRecord.load(self.record_file), wanted, report, dry_run)
            return report
        with locked(self.record_file.with_name(self.record_file.name + ".lock")):
            record = LinkRecord.load(self.record_file)
            try:
                self._sync(record, wanted, report, dry_run)
                self._remove_empty_dirs(record)
            finally:
                record.save()
        return report

    def _sync(self, record: LinkRecord, wanted: dict[Path, Link], report: SyncReport,
              dry_run: bool) -> None:
        # a file that appears or goes meanwhile fails its own link only, with a notice
        for key in list(record.links):
            try:
                self._drop(Path(key), wanted.get(Path(key)), record, report, dry_run)
            except OSError as e:
                report.notices.append(f"{key}: cannot remove ({e.strerror or e}); "
                                      "tried again on the next sync")
        for path, link in sorted(wanted.items()):
            try:
                self._place(path, link, record, report, dry_run)
            except OSError as e:
                report.notices.append(f"{path}: cannot link ({e.strerror or e}); "
                                      "tried again on the next sync")

    def _drop(self, path: Path, link: Link | None, record: LinkRecord, report: SyncReport,
              dry_run: bool) -> None:
        key = str(path)
        if link and str(link.target) == record.links[key]["target"]:
            return
        if not record.owns(path):
            del record.links[key]  # changed by someone else since: no longer ours
            return
        if link is None:
            if not dry_run:
                path.unlink()
                del record.links[key]
            report.removed.append(key)

    def _place(self, path: Path, link: Link, record: LinkRecord, report: SyncReport,
               dry_run: bool) -> None:
        key, target = str(path), str(link.target)
        if path.is_symlink() or path.exists():
            if not record.owns(path):
                report.notices.append(f"{path} exists and was not made by the bridge; "
                                      "left as it is")
                return
            if os.readlink(path) == target:
                report.kept.append(key)
            else:
                if not dry_run:
                    path.unlink()
                    path.symlink_to(target)
                report.replaced.append(key)
        else:
            if not dry_run:
                self._make_dirs(path.parent, record)
                path.symlink_to(target)
            report.created.append(key)
        if not dry_run:
            record.links[key] = {"target": target, "names": link.names}

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
