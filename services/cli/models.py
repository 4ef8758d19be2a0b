"""`model show` and `model run`."""

from __future__ import annotations

import asyncio
import difflib
import json
import shlex
import urllib.error
import urllib.request
from dataclasses import asdict

import aiohttp
import click

from services.cli.common import load_catalog, load_settings
from services.cli.ollama_cmds import file_size
from shared.catalog import Catalog, Entry, loose
from shared.engines import EngineError, make_engine
from shared.engines.base import Running
from shared.model_flags import flatten


def _value(value) -> str:
    if value is None or value == [] or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return shlex.join(flatten(value))  # llama-server options: [flag, *values] each
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if all(isinstance(v, str) and " " not in v
                                                       for v in value) else shlex.join(value)
    return str(value)


def _arguments(settings, entry: Entry) -> tuple[list[str], Running | None] | None:
    """The engine's command line for the model and whether it runs now (loaded or loading,
    with its own llama-server's port), or None when the engine does not answer."""
    engine = make_engine(settings)

    async def ask() -> tuple[list[str], Running | None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            args = await engine.arguments(session, entry)
            running = await engine.running(session, Catalog(entries={entry.id: entry}))
            return args, running.get(entry.id)

    try:
        return asyncio.run(ask())
    except (aiohttp.ClientError, EngineError, TimeoutError, ValueError):
        return None


def without_port(args: list[str]) -> list[str]:
    """The arguments but `--port N`: a model that is not loaded has no port (the engine picks
    one at each load), and a number there would look like an address to call."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--port":
            skip = True
        elif not arg.startswith("--port="):
            out.append(arg)
    return out


@click.command()
@click.argument("name")
def show(name: str) -> None:
    """Every resolved setting of NAME and the exact engine arguments."""
    settings = load_settings()
    catalog = load_catalog(settings)
    entry = catalog.resolve(name)
    if entry is None:
        close = catalog.closest(name)
        raise click.ClickException(f"no model named {name!r}" +
                                   (f"; closest: {', '.join(close)}" if close else ""))
    for key, value in asdict(entry).items():
        if key == "size_bytes":
            click.echo(f"{'size':16} {file_size(value)}")
        elif key != "info":
            click.echo(f"{key.replace('_', ' '):16} {_value(value)}")
    info = entry.info
    click.echo(f"{'gguf':16} {info.get('architecture')}, {info.get('param_count', 0):,} "
               f"parameters, {info.get('file_type')}, trained context "
               f"{info.get('context_length')}, {info.get('block_count')} layers")
    if entry.backend != "engine":
        click.echo(f"\nanswered by Ollama as {entry.ollama} ({settings.ollama_base})")
        return
    engine = make_engine(settings)
    found = _arguments(settings, entry)
    if found:
        args, running = found
        if running and running.port:
            click.echo(f"\n{running.state} now: its own llama-server at "
                       f"http://127.0.0.1:{running.port} (a new port at each load)")
            click.echo(f"{engine.name} runs it as:")
            click.echo("  " + shlex.join(args))
            return
        click.echo(f"\n{running.state if running else 'not loaded'}: no port yet (the engine "
                   "picks one at each load)")
        click.echo(f"{engine.name} runs it as (without its port):")
        click.echo("  " + shlex.join(without_port(args)))
        return
    click.echo(f"\nnot loaded as far as is known: the engine is not running to say more; "
               f"{engine.name} config for this model:")
    one = engine.render(Catalog(entries={entry.id: entry}))
    click.echo("\n".join("  " + line for line in one.splitlines()
                         if line and not line.startswith(("#", ";"))))


def _stream(url: str, body: dict, key: str) -> str:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    answer = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
            if delta.get("reasoning_content"):
                click.secho(delta["reasoning_content"], nl=False, dim=True)
            if delta.get("content"):
                answer.append(delta["content"])
                click.echo(delta["content"], nl=False)
    click.echo()
    return "".join(answer)


def _known(settings, name: str) -> None:
    """Fail before the prompt when the proxy is down or has no such model."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    req = urllib.request.Request(settings.proxy_url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            models = json.loads(r.read()).get("data", [])
    except urllib.error.HTTPError as e:
        raise click.ClickException(_message(e)) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"the proxy at {settings.proxy_url} is not answering "
                                   f"({e}); start it with `model start`") from None
    names = {n for m in models for n in [m["id"], *m.get("aliases", [])]}
    spellings = names | {loose(n) for n in names} | {f"{n}:latest" for n in names}
    # as the proxy resolves them: with or without MODEL_PREFIX, with or without the colon
    if not {name, loose(name), settings.model_prefix + name,
            loose(settings.model_prefix + name)} & spellings:
        close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.4)
        raise click.ClickException(f"no model named {name!r}" +
                                   (f"; closest: {', '.join(close)}" if close else
                                    "; `model list --config` lists them"))


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(e.reason)


@click.command()
@click.argument("name")
def run(name: str) -> None:
    """Chat with NAME through the proxy, streaming. /bye or Ctrl-D ends; Ctrl-C stops an
    answer."""
    settings = load_settings()
    _known(settings, name)
    url = settings.proxy_url + "/v1/chat/completions"
    messages: list[dict] = []
    while True:
        try:
            text = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        if text.strip() in ("/bye", "/exit"):
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream(url, {"model": name, "messages": messages, "stream": True},
                            settings.api_key)
        except KeyboardInterrupt:
            click.echo("\n[stopped]")
            messages.pop()  # the question goes unanswered; the chat goes on
            continue
        except urllib.error.HTTPError as e:
            raise click.ClickException(_message(e)) from None
        except OSError as e:
            raise click.ClickException(f"the proxy at {settings.proxy_url} is not answering "
                                       f"({e}); start it with `model start`") from None
        messages.append({"role": "assistant", "content": reply})
