"""The Ollama stand-in (kept for pulls, which the real Ollama cannot make offline) answers as
the real Ollama 0.33 did: every exchange in ollama-recorded/standin-vs-ollama.json (beside
the real binaries) on a route the stand-in serves is sent to it and compared with the real
answer. Values that depend on the machine or the model (a DNS server's address, sizes,
times) are compared by their shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.real_engines import SHARED

RECORDED = SHARED / "ollama-recorded" / "standin-vs-ollama.json"
# the recorded exchanges on the stand-in's routes; the rest need a model loaded or answering
SERVED = ("version", "tags row tinychat:latest", "pull (offline / unknown)",
          "pull stream:false (offline / unknown)", "delete unknown", "GET / ", "HEAD / ")


def observe(url: str, call: str) -> dict:
    """The answer to a recorded call (`POST /api/pull {...}`), in the recording's form."""
    method, path, *body = call.split(" ", 2)
    req = urllib.request.Request(url + path, method=method,
                                 data=body[0].encode() if body else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    lines = [json.loads(x) for x in raw.splitlines() if x.strip().startswith(b"{")]
    if len(lines) == 1 and raw.strip().startswith(b"{"):
        return {"status": status, "body": lines[0]}
    if raw and not lines:
        return {"status": status, "body": {"text": raw.decode()}}
    return {"status": status, "body": {"first_line": lines[0] if lines else None,
                                       "last_line": lines[-1] if lines else None,
                                       "n_lines": len(lines)}}


def shape(value: object) -> object:
    """Keys and kinds of values, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def offline(error: str) -> str:
    """An offline pull's error up to the name lookup (the real one adds its DNS server)."""
    return error.split(" on ")[0].removesuffix(": no such host")


def test_the_standin_answers_as_the_real_ollama_did(ollama) -> None:
    if not RECORDED.is_file():
        pytest.skip(f"no recording of the real Ollama's answers at {RECORDED}")
    url, _ = ollama
    recorded = {e["label"]: e for e in json.loads(RECORDED.read_text())}
    pulled = observe(url, 'POST /api/pull {"model": "tinychat"}')["body"]["last_line"]
    assert pulled == {"status": "success"}
    for label in SERVED:
        call, real = recorded[label]["call"], recorded[label]["real_ollama"]
        ours = observe(url, call)
        assert ours["status"] == real["status"], label
        body, theirs = ours["body"], real["body"]
        if label.startswith("tags row"):
            row = next(m for m in body["models"] if m["name"] == theirs["name"])
            assert shape(row) == shape(theirs)
            assert list(row) == list(theirs)  # in Ollama's order, which `ollama list` reads
        elif label.startswith("pull stream:false"):
            assert offline(body["error"]) == offline(theirs["error"])
        elif label.startswith("pull"):
            assert body["first_line"] == theirs["first_line"] and body["n_lines"] == 2
            assert offline(body["last_line"]["error"]) == offline(theirs["last_line"]["error"])
        else:
            assert body == theirs, label
