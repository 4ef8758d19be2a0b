"""`model`: manage the stack and the models from the shell."""

from __future__ import annotations

import sys

import click

from services.cli import doctor, logs_cmd, memory_cmds, models, ollama_cmds, service, stack, top
from services.cli.sync_cmd import sync


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """model-serve: every local GGUF model on one OpenAI-compatible port."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        # a missing command is a usage error (exit 2, as click >= 8.2 has it; click 8.1
        # exited 0): the usage and the commands, on stderr
        click.echo(ctx.get_help(), err=True)
        ctx.exit(2)


for command in (sync, stack.start, stack.stop, stack.status, stack.restart, stack.supervise,
                logs_cmd.logs, service.service, doctor.doctor, ollama_cmds.pull,
                ollama_cmds.rm,
                ollama_cmds.list_models, ollama_cmds.names, models.show, models.run,
                memory_cmds.stats, memory_cmds.load, memory_cmds.unload, top.top):
    cli.add_command(command)


def main() -> None:
    sys.exit(cli(standalone_mode=True))
