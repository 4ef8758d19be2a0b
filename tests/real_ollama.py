"""The real Ollama for a test module: `ollama serve` on a free port with a store, HOME and
log of its own (nothing touches the user's ~/.ollama), models made with `ollama create` from
generated GGUF files, and what a user can see of it: its answers, its log, its processes."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from shared.tiny_gguf import write_model
from tests import real_engines
from tests.harness import end, free_port, http, wait

# The line Ollama logs each time it starts a model's runner (0.33: its llama-server child).
RUNNER_START = re.compile(r'msg="starting (llama-server|llama server|runner)"')


@dataclass
class RealOllama:
    exe: Path
    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def log(self) -> Path:
        return self.root / "ollama.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.root / "home"), "OLLAMA_NO_CLOUD": "1",
                "OLLAMA_HOST": f"127.0.0.1:{self.port}", "OLLAMA_MODELS": str(self.store)}

    @classmethod
    def start(cls, root: Path) -> RealOllama:
        """Skips the test when no real Ollama is found."""
        ollama = cls(real_engines.ollama(), root, free_port())
        (root / "home").mkdir(parents=True, exist_ok=True)
        ollama.store.mkdir(exist_ok=True)
        log = open(ollama.log, "ab")  # noqa: SIM115 - lives with the process
        ollama.proc = subprocess.Popen([str(ollama.exe), "serve"], env=ollama.env, stdout=log,
                                       stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not ollama.answers():
            if ollama.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the real Ollama did not start:\n{ollama.log_text()}")
            time.sleep(0.05)
        return ollama

    def answers(self) -> bool:
        try:
            return http("GET", self.url + "/api/version", timeout=1)[0] == 200
        except OSError:
            return False

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The Go CLI against this Ollama, or with OLLAMA_HOST given, another server."""
        return subprocess.run([str(self.exe), *args], env=self.env, capture_output=True,
                              text=True, timeout=120)

    def create(self, name: str, seed: int = 0, **model) -> None:
        """`ollama create name` from a generated model whose words are printable ASCII (Ollama
        drops an answer that is not valid UTF-8); `model`: write_model's shape."""
        work = self.root / "gguf" / re.sub(r"[^a-z0-9]+", "-", name.lower())
        gguf = write_model(work / "model.gguf", name=name.split(":")[0].split("/")[-1],
                           seed=seed, **{"ascii_only": True, **model})
        (work / "Modelfile").write_text(f"FROM {gguf}\n")
        done = self.cli("create", name, "-f", str(work / "Modelfile"))
        assert done.returncode == 0, done.stderr

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def runner_starts(self) -> int:
        return len(RUNNER_START.findall(self.log_text()))

    def runners(self) -> list[psutil.Process]:
        """The model processes `ollama serve` runs (llama-server in 0.33)."""
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def loaded(self) -> dict[str, dict]:
        return {m["name"]: m for m in http("GET", self.url + "/api/ps")[1]["models"]}

    def unload_all(self) -> None:
        """Every model out of memory and its runner ended: the next request starts cold."""
        for name in self.loaded():
            http("POST", self.url + "/api/generate", {"model": name, "keep_alive": 0})
        wait(lambda: not self.loaded() and not self.runners(), 30)

    def stop(self) -> None:
        """Ollama and the runners it started (by the pids it gave them)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        runners = self.runners()
        end(self.proc, 15)
        for runner in runners:
            if runner.is_running():
                runner.kill()
