"""`model show` and `model run`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict

import click

from services.cli.common import load_catalog, load_settings
from shared.catalog import Catalog
from shared.engines import make_engine


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
        if key != "info":
            click.echo(f"{key:12} {value}")
    info = entry.info
    click.echo(f"{'gguf':12} {info.get('architecture')}, {info.get('param_count', 0):,} "
               f"parameters, {info.get('file_type')}, trained context "
               f"{info.get('context_length')}, {info.get('block_count')} layers")
    engine = make_engine(settings)
    if entry.backend == "engine":
        click.echo(f"\n{engine.name} config for this model:")
        one = engine.render(Catalog(entries={entry.id: entry}))
        click.echo("\n".join(line for line in one.splitlines()
                             if line and not line.startswith(("#", ";"))))
    else:
        click.echo(f"\nanswered by Ollama as {entry.ollama} ({settings.ollama_base})")


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


@click.command()
@click.argument("name")
def run(name: str) -> None:
    """Chat with NAME through the proxy, streaming. /bye or Ctrl-D ends."""
    settings = load_settings()
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
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise click.ClickException(message) from None
        except OSError as e:
            raise click.ClickException(f"the proxy at {settings.proxy_url} is not answering "
                                       f"({e}); start it with `model start`") from None
        messages.append({"role": "assistant", "content": reply})
