"""``sevsim demo``: the main job."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from sevsim.cli.options import build_profile, json_option, profile_option, seed_option
from sevsim.cli.render import hexdump
from sevsim.demo import DemoResult, run_demo


@click.command()
@profile_option()
@click.option(
    "--tsme",
    is_flag=True,
    help="Only the Transparent SME part of the story (a BIOS option: everything encrypted).",
)
@seed_option
@json_option
def demo(profile_name: str, tsme: bool, seed, as_json: bool) -> int:
    """Boot a machine, enable SME, and show what the CPU and a DRAM dump see.

    Power on, boot Linux with mem_encrypt=on (its kernel is encrypted in place), write a
    secret through a C=1 mapping and a public string through a C=0 mapping, flush the
    caches, and compare what the CPU reads with what DRAM holds; then reboot with TSME and
    do it again. Every claim is checked: the exit code is 0 only if all checks pass.
    """
    profile = build_profile(profile_name, seed)
    result = run_demo(profile, sme=not tsme)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _render(result)
    return 0 if result.ok else 1


def _render(result: DemoResult) -> None:
    console = Console()
    width, rows = (16, 2) if console.width >= 150 else (8, 4)  # two 16-byte cells need ~150
    console.rule(f"[bold]sevsim demo[/bold] — profile {result.profile}")
    for number, step in enumerate(result.steps, 1):
        body = Table.grid(padding=(0, 1))
        body.add_column()
        body.add_row(step.explanation)
        if step.facts:
            facts = Table(show_header=False, box=None, padding=(0, 1))
            facts.add_column(style="bold")
            facts.add_column()
            for k, v in step.facts:
                facts.add_row(k, v)
            body.add_row(facts)
        for v in step.views:
            view = Table(
                title=f"{v.label} ({v.mapping}, physical address {v.physical_address:#x})",
                title_justify="left",
                title_style="bold",
            )
            view.add_column("what the CPU reads")
            view.add_column("what DRAM holds (cold-boot dump)")
            view.add_row(hexdump(v.cpu_reads, width, rows), hexdump(v.dram_holds, width, rows))
            body.add_row(view)
        for c in step.checks:
            mark = "[green]✔[/green]" if c.ok else "[red]✘[/red]"
            body.add_row(f"{mark} {c.what}")
        console.print(Panel(body, title=f"[bold]{number}. {step.title}[/bold]", title_align="left"))
    passed = sum(c.ok for s in result.steps for c in s.checks)
    total = sum(len(s.checks) for s in result.steps)
    if result.ok:
        console.print(f"[bold green]All {total} checks passed.[/bold green]")
    else:
        console.print(f"[bold red]{total - passed} of {total} checks failed.[/bold red]")
