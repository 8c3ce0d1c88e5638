"""``sevsim demo``: the main job."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table

from sevsim.cli.options import build_profile, json_option, profile_option, seed_option
from sevsim.cli.render import hexdump
from sevsim.demo import DemoResult, Step, Working, demo_steps
from sevsim.demo.report import write_report


@click.command()
@profile_option()
@click.option(
    "--attest",
    "attest_only",
    is_flag=True,
    help="Only launch attestation: session, measurement, tampering caught, secret injected.",
)
@click.option(
    "--sev",
    "sev_only",
    is_flag=True,
    help="Only the SEV part: guests, what the hypervisor sees, ASID swap, ASID recycling.",
)
@click.option(
    "--migrate",
    "migrate_only",
    is_flag=True,
    help="Only migration: a counting guest moves to another platform over TCP and goes on.",
)
@click.option(
    "--io",
    "io_only",
    is_flag=True,
    help="Only I/O: an SEV guest's disk through bounce buffers, in the clear and encrypted, "
    "and a device's DMA at a private page.",
)
@click.option(
    "--tsme",
    is_flag=True,
    help="Only the Transparent SME part of the story (a BIOS option: everything encrypted).",
)
@click.option(
    "--attacks",
    "attacks_only",
    is_flag=True,
    help="Only the attacks: each of `sevsim attack --list`, staged, its outcome checked.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write DIR/report.md with every step's figures and the pictures (PNG).",
)
@seed_option
@json_option
def demo(
    profile_name: str,
    attest_only: bool,
    sev_only: bool,
    migrate_only: bool,
    io_only: bool,
    tsme: bool,
    attacks_only: bool,
    report_dir: Path | None,
    seed,
    as_json: bool,
) -> int:
    """Boot a machine and show, step by step, what SME, SEV and TSME protect.

    SME: power on, boot Linux with mem_encrypt=on (its kernel is encrypted in place), let
    the guest owner authenticate the platform, write a secret through a C=1 mapping and a
    public string through a C=0 mapping, and compare what the CPU reads with what DRAM
    holds. Attestation: a remote owner opens a session, checks the launch measurement
    (and catches a patched firmware and a weaker policy), and sends a secret the guest
    then uses. SEV: start two SEV guests and an ordinary VM, compare what each guest, the
    hypervisor and DRAM see of the same secret, swap the guests' ASIDs (crash, not
    disclosure), and watch ASIDs being recycled (DEACTIVATE, WBINVD, DF_FLUSH, reuse).
    Migration: a counting guest moves to another platform and goes on. I/O: an SEV guest
    writes its disk (a real file) through swiotlb bounce buffers — the host reads the pool
    and the file — then again encrypted with a key sent as a launch secret; and a device's
    DMA at a private page meets ciphertext. TSME: reboot with TSME and look again. Attacks:
    each attack of the lab, with what it recovered and what stops it. Every claim is
    checked: the exit code is 0 only if all checks pass.
    """
    parts = (attest_only, sev_only, migrate_only, io_only, tsme, attacks_only)
    if sum(parts) > 1:
        raise click.UsageError(
            "--attest, --sev, --migrate, --io, --tsme and --attacks each pick one part; "
            "give one at most"
        )
    profile = build_profile(profile_name, seed)
    every = not any(parts)
    console = None if as_json else Console()
    result = DemoResult(profile.name, [])
    progress = _Progress()
    try:
        if console is not None:
            console.rule(f"[bold]sevsim demo[/bold] — profile {result.profile}")
        for item in demo_steps(
            profile,
            sme=every,
            attest=attest_only or every,
            sev=sev_only or every,
            migrate=migrate_only or every,
            io=io_only or every,
            tsme=tsme or every,
            attacks=attacks_only or every,
        ):
            if isinstance(item, Working):
                progress.show(f"step {len(result.steps) + 1}: {item.what}")
                continue
            result.steps.append(item)
            if console is not None:  # each step as soon as it is complete
                progress.pause()
                console.print(_panel(item, len(result.steps), console.width))
        if report_dir is not None:
            progress.show(f"writing {report_dir / 'report.md'} and the pictures")
            try:
                path = write_report(result, profile, report_dir)
            except OSError as exc:
                raise click.ClickException(f"{report_dir}: {exc.strerror or exc}") from None
            progress.pause()
            click.echo(f"report written to {path}", err=True)
    finally:
        progress.pause()
    if console is None:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _summary(result, console)
    return 0 if result.ok else 1


class _Progress:
    """A transient line on stderr naming what the demo is doing, with a spinner; only when
    stderr is a terminal. Paused (and erased) while a step is printed."""

    def __init__(self) -> None:
        err = Console(stderr=True)
        self._spinner = Spinner("dots", style="cyan")
        self._live = None
        if err.is_terminal:
            self._live = Live(
                self._spinner,
                console=err,
                transient=True,
                redirect_stdout=False,  # stdout may be a file: the panels must go there
                redirect_stderr=False,
                refresh_per_second=12.5,
            )
        self._running = False

    def show(self, what: str) -> None:
        if self._live is None:
            return
        self._spinner.update(text=escape(what) + " …")
        if not self._running:
            self._live.start()
            self._running = True

    def pause(self) -> None:
        if self._live is not None and self._running:
            self._live.stop()
            self._running = False


def _panel(step: Step, number: int, console_width: int) -> Panel:
    # two 16-byte cells need ~150 columns
    width, rows = (16, 2) if console_width >= 150 else (8, 4)
    body = Table.grid(padding=(0, 1))
    body.add_column()
    body.add_row(step.explanation)
    if step.facts:
        facts = Table(show_header=False, box=None, padding=(0, 1))
        facts.add_column(style="bold")
        facts.add_column()
        for k, v in step.facts:
            facts.add_row(escape(k), escape(v))  # console lines hold "[cpu0]"
        body.add_row(facts)
    for v in step.views:
        view = Table(
            title=f"{v.label} ({v.mapping}, physical address {v.physical_address:#x})",
            title_justify="left",
            title_style="bold",
        )
        cells = [v.cpu_reads, v.dram_holds]
        if v.host_reads is None:
            w, r = width, rows
            view.add_column("what the CPU reads")
        else:  # guest memory: three views side by side
            w, r = (16, 2) if console_width >= 225 else (8, 4) if console_width >= 125 else (4, 8)
            view.add_column("what the guest reads")
            view.add_column("what the hypervisor reads")
            cells.insert(1, v.host_reads)
        view.add_column("what DRAM holds (cold-boot dump)")
        view.add_row(*(hexdump(c, w, r) for c in cells))
        body.add_row(view)
    for t in step.tables:
        table = Table(title=t.title, title_justify="left", title_style="bold")
        for column in t.columns:
            table.add_column(column)
        for i, row in enumerate(t.rows):
            last_of_moment = i + 1 == len(t.rows) or t.rows[i + 1][0] != ""
            table.add_row(*(escape(c) for c in row), end_section=last_of_moment)
        body.add_row(table)
    for c in step.checks:
        mark = "[green]✔[/green]" if c.ok else "[red]✘[/red]"
        body.add_row(f"{mark} {c.what}")
    return Panel(body, title=f"[bold]{number}. {step.title}[/bold]", title_align="left")


def _summary(result: DemoResult, console: Console) -> None:
    passed = sum(c.ok for s in result.steps for c in s.checks)
    total = sum(len(s.checks) for s in result.steps)
    if result.ok:
        console.print(f"[bold green]All {total} checks passed.[/bold green]")
    else:
        console.print(f"[bold red]{total - passed} of {total} checks failed.[/bold red]")
