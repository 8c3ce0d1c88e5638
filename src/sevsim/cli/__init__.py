"""The ``sevsim`` command line.

Every command has ``--help``; scripts get ``--json``. Bad arguments produce one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from sevsim import __version__
from sevsim.cli.attack import attack_cmd
from sevsim.cli.bench import bench
from sevsim.cli.demo import demo
from sevsim.cli.fuzz import fuzz
from sevsim.cli.info import info
from sevsim.cli.owner import owner
from sevsim.cli.platform import platform
from sevsim.cli.verify import verify_chain_cmd
from sevsim.cli.view import view_cmd
from sevsim.cli.vm import migrate_cmd, vm


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="sevsim")
def cli() -> None:
    """sevsim: a software AMD EPYC machine with memory encryption (SME, TSME, SEV).

    Start with `sevsim demo`: it boots a machine, runs Linux's SME sequence and shows,
    side by side, what the CPU reads and what a physical attacker's DRAM dump holds.
    """


cli.add_command(demo)
cli.add_command(info)
cli.add_command(bench)
cli.add_command(platform)
cli.add_command(owner)
cli.add_command(verify_chain_cmd)
cli.add_command(vm)
cli.add_command(migrate_cmd)
cli.add_command(attack_cmd)
cli.add_command(view_cmd)
cli.add_command(fuzz)


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="sevsim", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else cli.get_help(click.Context(cli)))
        code = 0
    except click.UsageError as e:
        path = e.ctx.command_path if e.ctx else "sevsim"
        click.echo(f"{path}: error: {e.format_message()} (try '{path} --help')", err=True)
        code = 2
    except click.ClickException as e:
        click.echo(f"sevsim: error: {e.format_message()}", err=True)
        code = e.exit_code
    except SystemExit as e:  # commands that choose their own exit code (verify-chain)
        code = e.code if isinstance(e.code, int) else 1
    except click.Abort:
        click.echo("sevsim: aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        click.echo("sevsim: interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
