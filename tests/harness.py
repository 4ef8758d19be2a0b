"""Start the real stack (engine service + proxy service) on free ports for a test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def end(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stops a process a test started: asked first, killed if it does not go in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n different free ports: held open together, so the OS cannot hand out one twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def answers(url: str) -> bool:
    """GET `url` gives 200 (a server that is not up yet is no error)."""
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


def wait(check, timeout: float = 60) -> None:
    """Until `check()` is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def limit_threshold(system: dict, limit_bytes: int) -> str:
    """MEMORY_PRESSURE_THRESHOLD that puts the governor's limit `limit_bytes` above what the
    machine counts as used in `system` (/running's system line)."""
    return f"{100 * (system['os_used'] + limit_bytes) / system['total']:.3f}"


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HARMONY_PROXY_PORT']}"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LLAMA_SWAP_PORT']}"

    @property
    def state_dir(self) -> Path:
        return Path(self.env["STATE_DIR"])

    @property
    def engine_headers(self) -> dict[str, str]:
        """What the stack's own processes send the engine: its per-start key."""
        key = (self.state_dir / "engine.key").read_text().strip()
        return {"Authorization": f"Bearer {key}"}

    def start(self, *services: str, wait: bool = True) -> Stack:
        for service in services or ("engine", "proxy"):
            log = open(self.root / f"{service}.log", "ab")  # noqa: SIM115 - lives with the proc
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = http("GET", self.url + "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("stack did not become healthy:\n" + self.logs())

    def restart(self, service: str) -> None:
        """Stop the service's process and start it again, with the stack's env as it is now."""
        [proc] = [p for p in self.procs if p.args[-1] == f"services.{service}"]
        self.procs.remove(proc)
        proc.terminate()
        proc.wait(30)
        self.start(service)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.root.glob("*.log")))

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, input=input,
                              timeout=120)

    def stop(self) -> None:
        """The engine last, as `model stop` does: the proxy saves its models' contexts."""
        engine = [p for p in self.procs if p.args[-1] == "services.engine"]
        for group in ([p for p in self.procs if p not in engine], engine):
            for proc in group:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()


def make_stack(tmp: Path, models_dir: Path, config_dir: Path, **env: str) -> Stack:
    proxy, engine, governor, ollama = free_ports(4)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "LLAMA_SWAP"))}
    full = {
        **base,
        "MODELS_DIR": str(models_dir),
        "STATE_DIR": str(tmp / "state"),
        "CONFIG_DIR": str(config_dir),
        "HARMONY_PROXY_PORT": str(proxy),
        "LLAMA_SWAP_PORT": str(engine),
        "GOVERNOR_PORT": str(governor),  # never a port the user's own stack may hold
        "MODEL_SERVE_ENV_FILE": str(tmp / "no.env"),
        "ENGINE": "router",
        # never a real Ollama of the machine's
        "OLLAMA_BASE": f"http://127.0.0.1:{ollama}",
        "OLLAMA_MODELS": str(tmp / "no-ollama"),
        **env,
    }
    return Stack(tmp, full)


def start_ollama(tmp: Path) -> tuple[str, Path, subprocess.Popen]:
    """The Ollama stand-in on a free port with its store in tmp/ollama."""
    store, port = tmp / "ollama", free_port()
    log = open(tmp / "ollama.log", "ab")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, "-m", "tests.standins.ollama", "--models",
                             str(store), "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http("GET", url + "/api/version", timeout=1)[0] == 200:
                return url, store, proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the Ollama stand-in did not start")
