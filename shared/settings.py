"""Settings from the environment and `.env`, validated in one place with the defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
# Set by `model supervise` for every process of one running stack; /health reports it.
INSTANCE_ENV = "MODEL_SERVE_INSTANCE"
# set by supervisord for the engine service alone, which it signals alone (stopasgroup=false):
# its llama-server gets no signal of supervisord's, so the engine stops it at once
STOPPED_ALONE_ENV = "MODEL_SERVE_STOPPED_ALONE"
# Every variable load() reads (the installed service carries those set when it is installed).
ENV_KEYS = (
    "ALLOWED_HOSTS", "API_KEY", "BRIDGE_SYNC_INTERVAL", "CACHE_RAM_MIB", "CONFIG_DIR",
    "CONTEXT_CACHE_DIR", "CONTEXT_CACHE_GB", "CORS_ORIGINS", "DEFAULT_CTX_SIZE",
    "DEFAULT_PARALLEL", "DEMO_MODEL", "DRAIN_SECONDS",
    "EMBEDDINGS_TO_OLLAMA", "ENGINE", "GOVERNOR_PORT", "HARMONY_PROXY_PORT", "LISTEN_HOST",
    "LLAMA_SERVER", "LLAMA_SWAP_PORT", "LOAD_WAIT", "MAX_BODY_BYTES", "MAX_MESSAGES", "MAX_QUEUE",
    "MEMORY_ADMISSION",
    "MEMORY_PRESSURE_THRESHOLD", "MEMORY_SIMULATION_FILE", "MIN_MODEL_AGE_SECONDS",
    "MODELS_DIR", "MODEL_PREFIX", "MODEL_SERVE_ENV_FILE", "MODEL_TTL", "OLLAMA_BASE",
    "OLLAMA_MODELS", "PEERS", "PEER_POLL_SECONDS", "PRESSURE_CHECK_INTERVAL",
    "PRESSURE_MACOS_LEVEL",
    "PRESSURE_PAGING_MIB_S", "PRESSURE_PSI_LEVEL", "READ_TIMEOUT", "REQUEST_READ_TIMEOUT",
    "ROUTE_TO_OLLAMA",
    "STATE_DIR", "SYNC_DEBOUNCE_SECONDS", "WRITE_TIMEOUT")
# llama-server's own --cache-ram: the host memory each of its processes may keep prompts in
LLAMA_CACHE_RAM_MIB = 8192


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the reason."""


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    model_prefix: str
    default_ctx_size: int
    model_ttl: int
    default_parallel: int
    proxy_port: int
    engine_port: int
    listen_host: str
    engine: str
    llama_server: str
    state_dir: Path
    config_dir: Path
    max_body_bytes: int
    max_messages: int
    max_queue: int
    request_read_timeout: float
    write_timeout: float
    read_timeout: float  # seconds a model may send nothing before it is taken for hung
    drain_seconds: float
    api_key: str
    allowed_hosts: tuple[str, ...]
    cors_origins: tuple[str, ...]
    ollama_base: str
    ollama_models: Path
    bridge_sync_interval: int
    sync_debounce: float
    route_to_ollama: tuple[str, ...]
    embeddings_to_ollama: tuple[str, ...]
    demo_model: bool
    pressure_threshold: float
    pressure_interval: float
    min_model_age: float
    load_wait: float  # seconds a load may wait for room before it is refused
    memory_admission: bool
    governor_port: int
    memory_simulation: Path | None
    psi_level: float
    paging_mib_s: float
    mac_pressure_level: str
    cache_ram_mib: int  # the most one model's prompt cache may take
    context_cache_dir: Path  # where models' slots are saved when they leave
    context_cache_bytes: int  # the most that folder may hold; 0: nothing is saved
    # peers (shared/peers.py): other stacks' base URLs, and how often each is asked
    peers: tuple[str, ...] = ()
    peer_poll_seconds: float = 5.0

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def proxy_url(self) -> str:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "::", "") else self.listen_host
        return f"http://{host}:{self.proxy_port}"

    @property
    def custom_models_file(self) -> Path:
        return self.config_dir / "custom_models.yaml"

    @property
    def catalog_file(self) -> Path:
        return self.state_dir / "catalog.json"

    @property
    def governor_url(self) -> str:
        return f"http://127.0.0.1:{self.governor_port}"

    @property
    def footprints_file(self) -> Path:
        return self.state_dir / "footprints.json"

    @property
    def bridge_record(self) -> Path:
        return self.state_dir / "bridge-links.json"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines, comments and an `export ` prefix are allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _int(env: dict[str, str], key: str, default: int, minimum: int = 0) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r}: not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{key}={value}: must be at least {minimum}")
    return value


def _bool(env: dict[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={raw!r}: expected on/off, true/false or 1/0")


def _words(env: dict[str, str], key: str, default: str) -> tuple[str, ...]:
    raw = env.get(key, default)
    return tuple(w.strip().lower() for w in raw.split(",") if w.strip())


def _number(env: dict[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r}: not a number") from None
    if value < 0:
        raise SettingsError(f"{key}={value}: must be 0 or more")
    return value


def _path(env: dict[str, str], key: str, default: Path) -> Path:
    raw = env.get(key, "").strip()
    return Path(os.path.expanduser(raw)) if raw else default


def load(environ: dict[str, str] | None = None, env_file: Path | None = None,
         total_memory: int | None = None) -> Settings:
    """The process environment wins over `.env`, which wins over the defaults.
    `total_memory`: the machine's, in bytes, which some defaults follow (None: this one's)."""
    environ = dict(os.environ if environ is None else environ)
    env_file = env_file or Path(environ.get("MODEL_SERVE_ENV_FILE", ROOT / ".env"))
    env = {**read_env_file(env_file), **environ}

    engine = env.get("ENGINE", "auto").strip() or "auto"
    if engine not in ("auto", "router", "llama-swap"):
        raise SettingsError(f"ENGINE={engine!r}: expected auto, router or llama-swap")
    ports = {
        key: _int(env, key, default, 1)
        for key, default in (("HARMONY_PROXY_PORT", 5846), ("LLAMA_SWAP_PORT", 5847),
                             ("GOVERNOR_PORT", 5848))
    }
    for key, port in ports.items():
        if port > 65535:
            raise SettingsError(f"{key}={port}: not a TCP port")
    if len(set(ports.values())) < len(ports):
        raise SettingsError("HARMONY_PROXY_PORT, LLAMA_SWAP_PORT and GOVERNOR_PORT must differ")
    threshold = _number(env, "MEMORY_PRESSURE_THRESHOLD", 75.0)
    if not 1 <= threshold <= 100:
        raise SettingsError(f"MEMORY_PRESSURE_THRESHOLD={threshold}: a percentage, 1 to 100")
    if total_memory is None:
        total_memory = psutil.virtual_memory().total
    # an eighth of the memory models may take, so that prompt caches cannot crowd out models
    cache_ram = min(LLAMA_CACHE_RAM_MIB, int(total_memory * threshold / 100 / 8) // 1024**2)
    simulation = env.get("MEMORY_SIMULATION_FILE", "").strip()
    mac_level = env.get("PRESSURE_MACOS_LEVEL", "warn").strip().lower() or "warn"
    if mac_level not in ("warn", "critical"):
        raise SettingsError(f"PRESSURE_MACOS_LEVEL={mac_level!r}: expected warn or critical")
    prefix = env.get("MODEL_PREFIX", "ms/")
    if any(c.isspace() or c == "," for c in prefix):
        raise SettingsError(f"MODEL_PREFIX={prefix!r}: no spaces or commas")
    cors_origins = tuple(o.rstrip("/") for o in _words(env, "CORS_ORIGINS", ""))
    for origin in cors_origins:
        if not origin.startswith(("http://", "https://")) or "/" in origin.split("://", 1)[1]:
            raise SettingsError(f"CORS_ORIGINS: {origin!r} is not an origin such as "
                                "http://localhost:3000")
    state_dir = _path(env, "STATE_DIR", Path.home() / ".local/state/model-serve")
    ollama_base = env.get("OLLAMA_BASE", "http://localhost:11434").strip().rstrip("/")
    if not ollama_base.startswith(("http://", "https://")):
        raise SettingsError(f"OLLAMA_BASE={ollama_base!r}: must start with http:// or https://")

    return Settings(
        models_dir=_path(env, "MODELS_DIR", Path.home() / ".cache/lm-studio/models"),
        model_prefix=prefix,
        default_ctx_size=_int(env, "DEFAULT_CTX_SIZE", 8192, 64),
        model_ttl=_int(env, "MODEL_TTL", 1800, 0),
        default_parallel=_int(env, "DEFAULT_PARALLEL", 1, 1),
        proxy_port=ports["HARMONY_PROXY_PORT"],
        engine_port=ports["LLAMA_SWAP_PORT"],
        listen_host=env.get("LISTEN_HOST", "127.0.0.1").strip() or "127.0.0.1",
        engine=engine,
        llama_server=env.get("LLAMA_SERVER", "").strip(),
        state_dir=state_dir,
        config_dir=_path(env, "CONFIG_DIR", ROOT / "config"),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 32 * 1024 * 1024, 1024),
        max_messages=_int(env, "MAX_MESSAGES", 4096, 1),
        max_queue=_int(env, "MAX_QUEUE", 512, 0),
        request_read_timeout=max(1.0, _number(env, "REQUEST_READ_TIMEOUT", 30.0)),
        write_timeout=max(1.0, _number(env, "WRITE_TIMEOUT", 30.0)),
        read_timeout=max(1.0, _number(env, "READ_TIMEOUT", 900.0)),
        drain_seconds=max(0.0, _number(env, "DRAIN_SECONDS", 30.0)),
        api_key=env.get("API_KEY", "").strip(),
        allowed_hosts=_words(env, "ALLOWED_HOSTS", ""),
        cors_origins=cors_origins,
        ollama_base=ollama_base,
        ollama_models=_path(env, "OLLAMA_MODELS", Path.home() / ".ollama/models"),
        bridge_sync_interval=_int(env, "BRIDGE_SYNC_INTERVAL", 3600, 0),
        sync_debounce=_number(env, "SYNC_DEBOUNCE_SECONDS", 0.3),
        route_to_ollama=_words(env, "ROUTE_TO_OLLAMA", "mxfp4"),
        embeddings_to_ollama=_words(env, "EMBEDDINGS_TO_OLLAMA", "embed"),
        demo_model=_bool(env, "DEMO_MODEL", True),
        pressure_threshold=threshold,
        pressure_interval=max(0.1, _number(env, "PRESSURE_CHECK_INTERVAL", 2.0)),
        min_model_age=_number(env, "MIN_MODEL_AGE_SECONDS", 5.0),
        load_wait=max(0.0, _number(env, "LOAD_WAIT", 300.0)),
        memory_admission=_bool(env, "MEMORY_ADMISSION", True),
        governor_port=ports["GOVERNOR_PORT"],
        memory_simulation=Path(simulation) if simulation else None,
        psi_level=_number(env, "PRESSURE_PSI_LEVEL", 10.0),
        paging_mib_s=_number(env, "PRESSURE_PAGING_MIB_S", 32.0),
        mac_pressure_level=mac_level,
        cache_ram_mib=_int(env, "CACHE_RAM_MIB", cache_ram, 0),
        context_cache_dir=_path(env, "CONTEXT_CACHE_DIR", state_dir / "context-cache"),
        context_cache_bytes=int(_number(env, "CONTEXT_CACHE_GB", 8.0) * 1024**3),
        peers=tuple(u.strip() for u in env.get("PEERS", "").split(",") if u.strip()),
        peer_poll_seconds=max(0.5, _number(env, "PEER_POLL_SECONDS", 5.0)),
    )
