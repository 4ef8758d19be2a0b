"""Other model-serve stacks (and llama-swap, Ollama or any OpenAI-compatible server) whose
models this stack also serves: `PEERS` in .env (base URLs) and `config/peers.yaml` (per-peer
name, kind, key and model filter). A problem names the file, the key and the reason and
leaves out only that entry."""

from __future__ import annotations

import fnmatch
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from shared.settings import ROOT, Settings, read_env_file

MODEL_SERVE, LLAMA_SWAP, OLLAMA, OPENAI = "model-serve", "llama-swap", "ollama", "openai"
KINDS = (MODEL_SERVE, LLAMA_SWAP, OLLAMA, OPENAI)
_KEYS = {"url", "kind", "api_key", "api_key_env", "models"}
# carried by every request and poll sent to a peer: a model-serve that gets it answers with
# its own models only, and forwards nothing to its own peers (A ↔ B never loops)
HOP = "X-Model-Serve-Peer-Hop"


@dataclass(frozen=True)
class Peer:
    name: str
    url: str
    kind: str = MODEL_SERVE
    api_key: str = ""
    models: tuple[str, ...] = ()  # fnmatch globs; empty: every model
    from_file: bool = False  # named in config/peers.yaml (else only in PEERS)

    def public(self) -> dict:
        """What clients may see of it (never its key)."""
        return {"name": self.name, "url": self.url, "kind": self.kind}

    def wants(self, model: str) -> bool:
        """Whether its filter lets the model through."""
        return not self.models or any(fnmatch.fnmatchcase(model, g) for g in self.models)


def headers(peer: Peer) -> dict[str, str]:
    """What every request to the peer carries: the hop mark and the peer's own key."""
    out = {HOP: "1", "Accept-Encoding": "identity"}
    if peer.api_key:
        out["Authorization"] = f"Bearer {peer.api_key}"
    return out


def probe(peer: Peer, timeout: float = 3.0) -> tuple[int | None, str]:
    """(its models after its filter, "") when it answers its list, else (None, why): what
    `model doctor` tells of each peer. A peer that refused our key: why starts with
    "refused our key"."""
    path = "/api/tags" if peer.kind == OLLAMA else "/v1/models"
    request = urllib.request.Request(peer.url + path, headers=headers(peer))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            data = json.loads(r.read())
        rows = data.get("models" if peer.kind == OLLAMA else "data") or []
        names = [m["name" if peer.kind == OLLAMA else "id"] for m in rows]
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return None, f"refused our key ({e.code}): check its api_key"
        return None, f"GET {path} answered {e.code}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"GET {path}: {getattr(e, 'reason', None) or e}"
    return sum(peer.wants(str(n)) for n in names), ""


def peers_file(settings: Settings) -> Path:
    return settings.config_dir / "peers.yaml"


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or \
            not urlsplit(url).hostname:
        return f"expected a base URL such as http://studio.local:5846, got {url!r}"
    return None


def _name_for(url: str, taken: set[str]) -> str:
    parts = urlsplit(url)
    name = parts.hostname or url
    return name if name not in taken else f"{name}:{parts.port or ''}".rstrip(":")


def _env(name: str) -> str:
    if name in os.environ:
        return os.environ[name]
    env_file = Path(os.environ.get("MODEL_SERVE_ENV_FILE", ROOT / ".env"))
    try:
        return read_env_file(env_file).get(name, "")
    except ValueError:
        return ""


def load_peers(settings: Settings) -> tuple[list[Peer], list[str]]:
    """The peers and notices (problems found, each naming file, key and reason). Never
    raises: an entry with a problem is left out, the others are used."""
    file = peers_file(settings)
    notices: list[str] = []
    entries: dict = {}
    if file.is_file():
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            return _bare(settings.peers, set(), []), [f"{file}: cannot be read, no peer "
                                                      f"settings used: {e}"]
        if not isinstance(data, dict) or not isinstance(data.get("peers") or {}, dict):
            notices.append(f"{file}: peers: expected a mapping of peer names to their "
                           "settings; ignored")
        else:
            entries = data.get("peers") or {}
            for key in data:
                if key != "peers":
                    notices.append(f"{file}: {key!r}: unknown top-level key, ignored "
                                   "(only 'peers:' is read)")
    peers: list[Peer] = []
    for name, spec in entries.items():
        where = f"{file}: peers.{name}"
        if not isinstance(spec, dict):
            notices.append(f"{where}: expected a mapping (url, kind, api_key, models); "
                           "left out")
            continue
        problems = [f"{where}.{k}: unknown key (known: {', '.join(sorted(_KEYS))})"
                    for k in spec if k not in _KEYS]
        url = str(spec.get("url") or "").rstrip("/")
        if problem := _url_problem(url):
            problems.append(f"{where}.url: {problem}")
        kind = spec.get("kind", MODEL_SERVE)
        if kind not in KINDS:
            problems.append(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        models = spec.get("models") or []
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            problems.append(f"{where}.models: expected a list of names or globs ('qwen*')")
        key = spec.get("api_key") or ""
        if spec.get("api_key_env"):
            key = _env(str(spec["api_key_env"])) or key
            if not key:
                problems.append(f"{where}.api_key_env: {spec['api_key_env']} is not set")
        if not isinstance(key, str):
            problems.append(f"{where}.api_key: expected text")
        if "/" in str(name) or not str(name).strip():
            problems.append(f"{where}: a peer's name must be text without '/'")
        if problems:
            notices.extend(p + "; this peer is left out" for p in problems)
            continue
        peers.append(Peer(str(name), url, kind, key, tuple(models), from_file=True))
    return _bare(settings.peers, {p.name for p in peers}, peers, notices), notices


def _bare(urls: tuple[str, ...], taken: set[str], peers: list[Peer],
          notices: list[str] | None = None) -> list[Peer]:
    """`peers` and a model-serve peer (no key, every model) for each URL of PEERS that no
    entry of peers.yaml names."""
    known = {p.url for p in peers}
    for url in urls:
        url = url.rstrip("/")
        if url in known:
            continue
        if problem := _url_problem(url):
            if notices is not None:
                notices.append(f"PEERS: {problem}; left out")
            continue
        name = _name_for(url, taken)
        taken.add(name)
        known.add(url)
        peers.append(Peer(name, url))
    return peers
