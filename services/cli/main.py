"""`model`: manage the stack and the models from the shell."""

from __future__ import annotations

import importlib
import sys

import click

# Each command's module is imported only when that command runs: together they import
# aiohttp, numpy (gguf), openai-harmony and supervisor, half a second before any work.
COMMANDS = {
    "doctor": "doctor:doctor", "list": "ollama_cmds:list_models", "load": "memory_cmds:load",
    "logs": "logs_cmd:logs", "names": "ollama_cmds:names", "pull": "ollama_cmds:pull",
    "restart": "stack:restart", "rm": "ollama_cmds:rm", "rpc-worker": "rpc_worker:rpc_worker",
    "run": "models:run",
    "service": "service:service", "show": "models:show", "start": "stack:start",
    "stats": "memory_cmds:stats", "status": "stack:status", "stop": "stack:stop",
    "supervise": "stack:supervise", "sync": "sync_cmd:sync", "top": "top:top",
    "unload": "memory_cmds:unload",
}


class Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, name = COMMANDS[cmd_name].split(":")
        return getattr(importlib.import_module(f"services.cli.{module}"), name)


@click.group(cls=Commands, invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """model-serve: every local GGUF model on one OpenAI-compatible port."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        # a missing command is a usage error (exit 2, as click >= 8.2 has it; click 8.1
        # exited 0): the usage and the commands, on stderr
        click.echo(ctx.get_help(), err=True)
        ctx.exit(2)


def main() -> None:
    sys.exit(cli(standalone_mode=True))
