"""``sevsim attack``: stage one of the known attacks and report what it recovered."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sevsim.attacks import ATTACKS
from sevsim.cli.options import build_profile, json_option, profile_option, seed_option


@click.command("attack")
@click.argument(
    "name", metavar="NAME", required=False, type=click.Choice(list(ATTACKS), case_sensitive=False)
)
@click.option("--list", "list_only", is_flag=True, help="List the attacks and exit.")
@profile_option()
@click.option(
    "--engine",
    type=click.Choice(["xe", "xex", "xex-fixed"]),
    help="Override the profile's AES engine mode: xe (Zen 1's fixed tweak), xex (per-boot "
    "random tweaks, Zen 2 and later) or xex-fixed (xex with Zen 1's fixed tweak).",
)
@seed_option
@json_option
def attack_cmd(
    name: str | None,
    list_only: bool,
    profile_name: str,
    engine: str | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Stage an attack on a fresh simulated machine, using only what that attacker really
    has (the hypervisor's mappings, NPT, VMCBs and the firmware API; or a DRAM dump), and
    report the steps, what was recovered, and which mitigation stops it.

    The JSON object has at least: attack, succeeded (the attacker reached its goal in this
    configuration), mitigated_by and figures. `sevsim attack --list` names them all.
    """
    if list_only or name is None:
        if as_json:
            click.echo(json.dumps([{"attack": a.name, "title": a.title} for a in ATTACKS.values()]))
        else:
            for a in ATTACKS.values():
                click.echo(f"{a.name:26} {a.title}")
        if name is None and not list_only:
            click.echo("\nRun one with: sevsim attack NAME [--profile P] [--json]", err=True)
        return
    changes: dict = {}
    if engine:
        changes = {"engine_mode": engine.removesuffix("-fixed")}
        changes["xex_fixed_tweak"] = engine == "xex-fixed"
    result = ATTACKS[name].run(build_profile(profile_name, seed, **changes))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    console = Console()
    body = Table.grid(padding=(0, 1))
    body.add_column()
    body.add_row(result.explanation)
    for i, text in enumerate(result.steps, 1):
        body.add_row(f"[bold]{i}.[/bold] {escape(text)}")
    verdict = (
        "[red]the attacker reached its goal[/red]"
        if result.succeeded
        else "[green]the attacker did not reach its goal[/green]"
    )
    body.add_row(f"Outcome: {verdict}")
    body.add_row(f"Mitigated by: {escape(result.mitigated_by)}")
    title = f"[bold]{result.attack}[/bold] — {result.title} ({result.profile}, {result.engine})"
    console.print(Panel(body, title=title, title_align="left"))
