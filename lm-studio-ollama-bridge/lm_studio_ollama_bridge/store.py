"""Read Ollama's on-disk store: manifests/<registry>/<namespace>/<model>/<tag> and blobs."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
DEFAULT_REGISTRY = "registry.ollama.ai"
GGUF_MAGIC = b"GGUF"
# `sha256:<hex>`: also keeps a digest from naming a path outside the blobs folder
DIGEST = re.compile(r"[a-z0-9]+:[0-9a-f]+")


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as the user pulled it: gemma3:12b, user/model:tag, hf.co/user/repo:tag
    registry: str
    namespace: str
    model: str
    tag: str
    blob: Path
    projector: Path | None
    parameter_size: str  # as Ollama's config gives it, e.g. "12.2B"
    quantization: str  # e.g. "Q4_K_M"

    @property
    def aliases(self) -> list[str]:
        """Every spelling Ollama accepts for it: `gemma3` means `gemma3:latest`."""
        names = [self.name]
        if self.tag == "latest":
            names.append(self.name.removesuffix(":latest"))
        if self.registry == DEFAULT_REGISTRY and self.namespace == "library":
            names.append(f"{self.registry}/library/{self.model}:{self.tag}")
        return names


def listed_names(names: list[str]) -> list[str]:
    """Of a link's names (every model's `aliases`), the ones Ollama lists, one per tag
    (`gemma3:latest`, `gemma3:12b`): not the spellings without a tag or with the registry."""
    return [n for n in names if ":" in n.rsplit("/", 1)[-1]
            and not n.startswith(f"{DEFAULT_REGISTRY}/library/")]


def ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    if registry == DEFAULT_REGISTRY:
        base = model if namespace == "library" else f"{namespace}/{model}"
    else:
        base = f"{registry}/{namespace}/{model}"
    return f"{base}:{tag}"


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _digest(layer: dict, what: str) -> str:
    digest = layer.get("digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"{what} has no usable digest ({digest!r:.80})")
    return digest


def _layers(text: str) -> tuple[str, str | None, str | None] | None:
    """(model, projector, config) digests of a manifest, None when it has no GGUF model
    layer; ValueError naming what is wrong when it is not the shape Ollama writes."""
    manifest = json.loads(text)
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(la, dict) for la in layers):
        raise ValueError("'layers' is not a list of layers")
    config = manifest.get("config", {})
    if not isinstance(config, dict):
        raise ValueError("'config' is not an object")
    model = next((la for la in layers if la.get("mediaType") == MODEL_LAYER), None)
    if model is None:
        return None
    projector = next((la for la in layers if la.get("mediaType") == PROJECTOR_LAYER), None)
    return (_digest(model, "the model layer"),
            _digest(projector, "the projector layer") if projector else None,
            _digest(config, "'config'") if "digest" in config else None)


def read_store(root: Path) -> tuple[list[OllamaModel], list[str]]:
    """Every GGUF model in the store, and a notice for each manifest passed over."""
    models: list[OllamaModel] = []
    notices: list[str] = []
    manifests = root / "manifests"
    # os.walk passes over folders removed while it walks (Ollama prunes them on `rm`)
    for path in sorted(Path(d) / f for d, _, files in os.walk(manifests) for f in files):
        parts = path.relative_to(manifests).parts
        if len(parts) < 4 or any(p.startswith(".") for p in parts):
            continue
        registry, namespace, model, tag = parts[0], "/".join(parts[1:-2]), parts[-2], parts[-1]
        name = ollama_name(registry, namespace, model, tag)
        try:
            digests = _layers(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            notices.append(f"{name}: unreadable manifest {path} ({e}), skipped")
            continue
        if digests is None:
            notices.append(f"{name}: no GGUF model layer (safetensors or MLX?), skipped")
            continue
        model_digest, projector_digest, config_digest = digests
        blob = blob_path(root, model_digest)
        if not blob.is_file():
            notices.append(f"{name}: model blob {blob} is missing, skipped")
            continue
        if not is_gguf(blob):
            notices.append(f"{name}: model blob is not GGUF, skipped")
            continue
        projector = blob_path(root, projector_digest) if projector_digest else None
        if projector is not None and not is_gguf(projector):
            notices.append(f"{name}: projector blob is not GGUF, served without it")
            projector = None
        config = _config(root, config_digest)
        models.append(OllamaModel(
            name=name, registry=registry, namespace=namespace, model=model, tag=tag,
            blob=blob, projector=projector,
            parameter_size=str(config.get("model_type") or "unknown"),
            quantization=str(config.get("file_type") or "unknown"),
        ))
    return models, notices


def _config(root: Path, digest: str | None) -> dict:
    if not digest:
        return {}
    try:
        data = json.loads(blob_path(root, digest).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
