"""lm-studio-ollama-bridge [--dry-run]: link Ollama's GGUF models into LM Studio's folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lm_studio_ollama_bridge.links import Bridge
from lm_studio_ollama_bridge.store import read_store


def _path(env: str, default: str) -> Path:
    return Path(os.path.expanduser(os.environ.get(env) or default))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lm-studio-ollama-bridge", description=__doc__)
    ap.add_argument("--ollama-models", type=Path,
                    default=_path("OLLAMA_MODELS", "~/.ollama/models"))
    ap.add_argument("--models-dir", type=Path,
                    default=_path("MODELS_DIR", "~/.cache/lm-studio/models"))
    ap.add_argument("--record", type=Path, default=None,
                    help="the record of links made (default: STATE_DIR/bridge-links.json)")
    ap.add_argument("--dry-run", action="store_true", help="print what it would do, do nothing")
    args = ap.parse_args(argv)
    record = args.record or _path("STATE_DIR", "~/.local/state/model-serve") / "bridge-links.json"
    print(f"Ollama's store {args.ollama_models} → {args.models_dir} (record {record})")
    models, notices = read_store(args.ollama_models)
    report = Bridge(args.models_dir, record).sync(models, dry_run=args.dry_run)
    for line in [f"note: {n}" for n in notices] + report.lines(args.dry_run):
        print(line)
    print(f"{len(models)} Ollama models; {len(report.created)} linked, "
          f"{len(report.replaced)} relinked, {len(report.removed)} removed, "
          f"{len(report.kept)} unchanged" + (" (dry run)" if args.dry_run else ""))
