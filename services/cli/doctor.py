"""`model doctor`: everything the stack needs, each finding with its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import psutil

from lm_studio_ollama_bridge.links import LinkRecord
from services.cli.stack import get_health, ours, port_holder, running_stack
from shared import harmony_encoding
from shared import settings as settings_mod
from shared.catalog import Catalog, embeddings_by_ollama
from shared.disk import biggest, full, mount_point, size, state_dir_problem
from shared.engines import make_engine
from shared.llama_server import find_llama_server
from shared.memory import first_estimate
from shared.model_kinds import EMBEDDING, kind
from shared.os_memory import system_memory
from shared.peers import load_peers, peers_file, probe
from shared.settings import Settings
from shared.sync import servable, sync_lock

GIB = 1024**3


@dataclass
class Finding:
    level: str  # ok, warn, fail
    what: str
    fix: str = ""


def check_llama_server(settings: Settings) -> Finding:
    engine = make_engine(settings)
    if engine.name == "llama-swap":
        out = subprocess.run([shutil.which("llama-swap") or "llama-swap", "--version"],
                             capture_output=True, text=True, timeout=20)
        return Finding("ok", f"engine: llama-swap ({(out.stdout or out.stderr).strip()})")
    try:
        binary = find_llama_server(settings)
    except FileNotFoundError as e:
        return Finding("fail", f"llama-server: {e}", "run `make install`, or set LLAMA_SERVER "
                       "to a llama-server binary (Homebrew: `brew install llama.cpp`)")
    try:
        help_text = subprocess.run([binary, "--help"], capture_output=True, text=True,
                                   timeout=30).stdout
    except OSError as e:
        return Finding("fail", f"llama-server {binary} does not run: {e}",
                       "set LLAMA_SERVER to a working binary, or run `make install`")
    missing = [f for f in ("--models-preset", "--no-models-autoload") if f not in help_text]
    if missing:
        return Finding("fail", f"llama-server {binary} is too old for router mode (no "
                       f"{', '.join(missing)})", "update llama.cpp (`brew upgrade llama.cpp`), "
                       "or unset LLAMA_SERVER to use the build `make install` makes")
    return Finding("ok", f"llama-server: {binary} (router mode)")


def check_ollama(settings: Settings, catalog: Catalog) -> Finding:
    """Ollama is optional: a warning only when served models route to it (Ollama's own
    embedding names, MXFP4 models, `backend: ollama`); the engine's own embedding models (a
    GGUF that pools, llama-server answers) need no Ollama."""
    try:
        with urllib.request.urlopen(settings.ollama_base + "/api/version", timeout=3) as r:
            version = json.loads(r.read()).get("version")
        return Finding("ok", f"Ollama {version} at {settings.ollama_base}")
    except (OSError, ValueError):
        pass
    embeddings = [e.id for e in catalog.entries.values() if kind(e.info, e.args) == EMBEDDING
                  and embeddings_by_ollama(settings, e)]
    routed = [e for e in catalog.entries.values() if e.backend == "ollama"]
    fix = "start it (`ollama serve`), or set OLLAMA_BASE"
    if embeddings:
        return Finding("warn", f"Ollama is not reachable at {settings.ollama_base}: embeddings "
                       f"with {', '.join(embeddings[:3])} (answered by Ollama) will fail, and "
                       "pulls", fix)
    if routed:
        return Finding("warn", f"Ollama is not reachable at {settings.ollama_base}: the "
                       f"models it answers ({', '.join(e.id for e in routed[:3])}) will fail, "
                       "and pulls", fix)
    return Finding("note", f"Ollama is not reachable at {settings.ollama_base}: no served "
                   "model needs it (the engine answers them all, embeddings too); `model "
                   "pull` does", fix + " to pull models with it")


def check_ports(settings: Settings) -> list[Finding]:
    if running_stack(settings) and ours(settings, get_health(settings)):
        return [Finding("ok", "ports: this stack is running on them")]
    out = []
    for key, attr in (("HARMONY_PROXY_PORT", "proxy_port"), ("LLAMA_SWAP_PORT", "engine_port"),
                      ("GOVERNOR_PORT", "governor_port")):
        port = getattr(settings, attr)
        host = settings.listen_host if attr == "proxy_port" else "127.0.0.1"
        holder = port_holder(host, port)
        out.append(Finding("ok", f"port {port} ({key}) is free") if holder is None else
                   Finding("fail", f"port {port} ({key}) is taken by {holder}",
                           f"stop that process, or set {key} in .env to a free port"))
    return out


def check_folders(settings: Settings) -> list[Finding]:
    out = []
    if settings.models_dir.is_dir():
        out.append(Finding("ok", f"MODELS_DIR {settings.models_dir}"))
    else:
        out.append(Finding("warn", f"MODELS_DIR {settings.models_dir} does not exist: only "
                           "the demo model will be served",
                           "put GGUF files there (LM Studio does), `model pull` one, or set "
                           "MODELS_DIR"))
    out.append(check_state_dir(settings))
    return out


def check_state_dir(settings: Settings) -> Finding:
    folder = settings.state_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return Finding("fail", f"STATE_DIR {folder} cannot be made: {e}",
                       "set STATE_DIR to a folder you can write")
    problem = state_dir_problem(settings)
    if problem is None:
        return Finding("ok", f"STATE_DIR {folder} is writable")
    if not full(folder):
        return Finding("fail", problem, "set STATE_DIR to a folder you can write")
    largest = ", ".join(f"{name} {size(n)}" for name, n in biggest(folder))
    return Finding("fail", f"{problem}. In STATE_DIR the most room is taken by: {largest}",
                   f"free room on {mount_point(folder)} (old logs in {folder / 'logs'} may "
                   "go), or set STATE_DIR to a folder on another disk; the stack serves on "
                   "meanwhile and is well again by itself once there is room")


def check_links(settings: Settings) -> Finding:
    record = LinkRecord.load(settings.bridge_record)
    broken = [path for path in record.links if not Path(path).exists()]
    if broken:
        return Finding("warn", f"{len(broken)} link(s) the bridge made point nowhere: "
                       + ", ".join(broken[:3]), "run `model sync` (it removes them)")
    return Finding("ok", f"bridge links: {len(record.links)}, none broken")


def served_catalog(settings: Settings) -> Catalog:
    with sync_lock(settings):  # the build updates STATE_DIR's ids and header cache
        return servable(settings, make_engine(settings))


def check_config_and_memory(settings: Settings, catalog: Catalog) -> list[Finding]:
    fix = (f"correct it in {settings.custom_models_file} (docs/configuration.md lists each "
           "setting), then run `model sync`; the rest is served meanwhile")
    out = [Finding("warn", notice, fix) for notice in catalog.notices]
    out.append(Finding("ok", f"config: {len(catalog.entries)} models served"))
    memory = system_memory()
    limit = memory.total * settings.pressure_threshold / 100
    room = limit - memory.used
    biggest = max(catalog.entries.values(), key=first_estimate, default=None)
    line = (f"memory: {memory.total / GIB:.1f} GiB, limit {settings.pressure_threshold:g}% = "
            f"{limit / GIB:.1f} GiB, {max(room, 0) / GIB:.1f} GiB free under it now")
    if biggest and first_estimate(biggest) > room:
        out.append(Finding("warn", f"{line}; the largest model, {biggest.id}, needs about "
                           f"{first_estimate(biggest) / GIB:.1f} GiB and cannot load now",
                           "raise MEMORY_PRESSURE_THRESHOLD, or close other programs"))
    else:
        out.append(Finding("ok", line))
    if sys.platform == "darwin" and biggest:
        out.append(check_wired_limit(first_estimate(biggest), biggest.id))
    return out


def check_wired_limit(need: int, model: str) -> Finding:
    """On Apple Silicon the GPU may wire at most iogpu.wired_limit_mb (0: the default, about
    two thirds to three quarters of memory); a model beyond it runs partly on the CPU."""
    out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True,
                         text=True)
    mb = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    limit = mb * 1024**2 or int(psutil.virtual_memory().total * 0.75)
    if need > limit:
        return Finding("warn", f"GPU wired limit {limit / GIB:.1f} GiB"
                       f"{'' if mb else ' (the default)'} is below what {model} needs, "
                       f"{need / GIB:.1f} GiB", "raise it: `sudo sysctl iogpu.wired_limit_mb="
                       f"{int(need / 1024**2 * 1.1)}` (until reboot)")
    return Finding("ok", f"GPU wired limit {limit / GIB:.1f} GiB holds the largest model")


def check_rpc_workers(settings: Settings, catalog: Catalog) -> list[Finding]:
    """The RPC workers models name and the ones this machine runs: llama.cpp's RPC has no
    authentication, so one listening beyond loopback is a warning."""
    from services.cli import service
    from services.proxy.manage.rpc_workers import local_workers_listening, named
    from shared.rpc import is_loopback, parse_address, reachable

    out: list[Finding] = []
    no_auth = ("llama.cpp's RPC has no authentication: whoever reaches it can use that "
               "machine's memory")
    private = ("keep the worker on a network only you reach (a private LAN, a VPN such as "
               "WireGuard or Tailscale) and block its port elsewhere; on one machine use "
               "127.0.0.1 (docs/rpc.md)")
    # a worker serves one llama-server at a time and queues one more connection: one a
    # loaded model holds is up, and a probe would only wait in its queue; the running
    # stack's /running knows which are held
    held = {w["address"] for w in _running_workers(settings) if w.get("in_use_by")}
    for address, models in named(catalog).items():
        host, _ = parse_address(address)
        users = ", ".join(models)
        if not is_loopback(host):
            out.append(Finding("warn", f"RPC worker {address} (used by {users}) is reached "
                               f"over the network: {no_auth}", private))
        if address not in held and not reachable(address):
            out.append(Finding("warn", f"RPC worker {address} (used by {users}) does not "
                               "answer: those models fail to load",
                               f"start it there: `model rpc-worker --host {host} --port "
                               f"{address.rsplit(':', 1)[1]}`"))
    rec = service.record(settings, service.RPC_WORKER)
    wide = [] if rec is None else [a for a in [rec.get("listen", "")]
                                   if a and not is_loopback(parse_address(a)[0])]
    wide += [a for a in local_workers_listening() if not is_loopback(parse_address(a)[0])
             and a not in wide]
    out += [Finding("warn", f"this machine's rpc-worker listens on {a}: {no_auth}", private)
            for a in wide]
    if named(catalog):
        try:
            help_text = subprocess.run([find_llama_server(settings), "--help"],
                                       capture_output=True, text=True, timeout=30).stdout
        except (OSError, FileNotFoundError, subprocess.TimeoutExpired):
            help_text = "--rpc"  # check_llama_server says what is wrong
        if "--rpc" not in help_text:
            out.append(Finding("fail", "llama-server was built without llama.cpp's RPC "
                               "backend (no --rpc): models with `rpc:` cannot load",
                               "run `make install` (its build has it), or use a llama.cpp "
                               "built with -DGGML_RPC=ON"))
        elif not out:
            out.append(Finding("ok", f"RPC workers: {len(named(catalog))}, on loopback, up"))
    return out


def _running_workers(settings: Settings) -> list[dict]:
    """The running stack's /running `rpc_workers`; none when it does not answer."""
    request = urllib.request.Request(settings.proxy_url + "/running", headers={
        "Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            return json.loads(r.read()).get("rpc_workers") or []
    except (OSError, ValueError, AttributeError):
        return []


def check_peers(settings: Settings) -> list[Finding]:
    """peers.yaml's problems (file, key, reason), and whether each peer answers its list."""
    peers, notices = load_peers(settings)
    out = [Finding("warn", f"peers: {n}", f"correct it in {peers_file(settings)} (or PEERS "
                   "in .env); the other peers are used meanwhile") for n in notices]
    for peer in peers:
        count, why = probe(peer)
        where = f"peer {peer.name} ({peer.kind}, {peer.url})"
        fix = peers_file(settings) if peer.from_file else "PEERS in .env"
        if count is not None:
            out.append(Finding("ok", f"{where}: up, {count} model(s)"))
        elif why.startswith("refused our key"):
            out.append(Finding("warn", f"{where}: unauthorized: peer {peer.name} {why}; its "
                               "models are not served until it takes our key",
                               f"set its api_key (the peer's API_KEY) in "
                               f"{peers_file(settings)}" if peer.from_file else
                               f"give it an entry with its api_key in {peers_file(settings)} "
                               "(PEERS in .env has no keys)"))
        else:
            out.append(Finding("warn", f"{where}: down: {why}; its models are not served "
                               "until it answers", f"start it, or correct its url or key in "
                               f"{fix}"))
    return out


def check_harmony() -> Finding:
    try:
        path = harmony_encoding.check_vocabulary()
        return Finding("ok", f"Harmony vocabulary {path}")
    except (OSError, harmony_encoding.VocabularyError) as e:
        return Finding("fail", f"Harmony vocabulary: {e}", "restore shared/data from git "
                       "(`git checkout shared/data`); GPT-OSS models need it")


CHECKS: list[Callable[[Settings, Catalog], Finding | list[Finding]]] = [
    lambda s, _: check_llama_server(s), check_ollama, lambda s, _: check_ports(s),
    lambda s, _: check_folders(s), lambda s, _: check_links(s), check_config_and_memory,
    check_rpc_workers, lambda _, __: check_harmony(), lambda s, _: check_peers(s)]


@click.command()
def doctor() -> None:
    """Check everything the stack needs; each problem comes with its fix."""
    try:
        settings = settings_mod.load()
    except settings_mod.SettingsError as e:
        click.echo(f"FAIL  settings: {e}\n      fix: correct it in .env or the environment")
        raise SystemExit(1) from None
    failed = False
    try:
        catalog = served_catalog(settings)
    except OSError as e:  # STATE_DIR unwritable: its check says so and how to fix it
        catalog = Catalog(entries={}, notices=[f"the catalog cannot be built: {e}"])
    for check in CHECKS:
        found = check(settings, catalog)
        for f in found if isinstance(found, list) else [found]:
            click.echo(f"{f.level.upper():5} {f.what}" + (f"\n      fix: {f.fix}" if f.fix and
                                                          f.level != "ok" else ""))
            failed |= f.level == "fail"
    if os.environ.get("MODEL_SERVE_ENV_FILE") is None and not (settings_mod.ROOT / ".env").exists():
        click.echo("note  no .env: the defaults apply (copy .env.example to change them)")
    raise SystemExit(1 if failed else 0)
