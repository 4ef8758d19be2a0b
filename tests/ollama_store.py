"""Write an Ollama store on disk the way Ollama lays it out, for tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.tiny_gguf import write_model


def put_blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return digest


def add_model(root: Path, name: str, *, seed: int = 0, projector: bool = False,
              data: bytes | None = None, params: str = "164.54K", quant: str = "F32") -> str:
    """Add a manifest for `name` (`gemma3:12b`, `user/m:tag`, `hf.co/u/r:tag`); returns the
    model blob's digest."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    if data is None:
        tmp = root / "tmp.gguf"
        write_model(tmp, name="model", seed=seed)
        data = tmp.read_bytes()
        tmp.unlink()
    digest = put_blob(root, data)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest,
               "size": len(data)}]
    if projector:
        tmp = root / "proj.gguf"
        write_model(tmp, name="proj", seed=seed + 100)
        layers.append({"mediaType": "application/vnd.ollama.image.projector",
                       "digest": put_blob(root, tmp.read_bytes()), "size": 1})
        tmp.unlink()
    config = put_blob(root, json.dumps({"model_format": "gguf", "model_type": params,
                                        "file_type": quant}).encode())
    manifest = root / "manifests" / Path(*parts) / (tag or "latest")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": {"digest": config},
                                    "layers": layers}))
    return digest
