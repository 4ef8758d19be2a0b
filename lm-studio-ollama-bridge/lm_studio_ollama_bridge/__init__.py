"""Serve Ollama's downloads from LM Studio's models folder through symlinks: no second copy.

Library: `read_store(ollama_models)` → models and notices; `plan(models, models_dir)` →
the links wanted; `Bridge(models_dir, record_file).sync(models, dry_run)` makes them.
Command: `lm-studio-ollama-bridge [--dry-run]` (or `python -m lm_studio_ollama_bridge`).
"""

from lm_studio_ollama_bridge.links import Bridge, LinkRecord, SyncReport, plan
from lm_studio_ollama_bridge.store import OllamaModel, read_store

__all__ = ["Bridge", "LinkRecord", "OllamaModel", "SyncReport", "plan", "read_store"]
