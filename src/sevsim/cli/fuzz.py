"""``sevsim fuzz``: robustness campaigns against the firmware (docs/reliability.md)."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from sevsim import tamper
from sevsim.cli.options import json_option, profile_option
from sevsim.fuzz import MailboxFuzzer, asid_load
from sevsim.profiles import get_profile


def _progress(quiet: bool) -> Progress:
    """A progress bar on stderr (none when the output is JSON)."""
    return Progress(
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=quiet,
    )


def _finish(out: dict, as_json: bool, summary: list[str], problems: list[str]) -> None:
    """A campaign's end: its JSON, or its summary lines and the first problems; exit
    code 1 if there were any."""
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for line in summary:
            click.echo(line)
        for problem in problems[:20]:
            click.echo(f"  {problem}")
    if problems:
        raise SystemExit(1)


@click.group()
def fuzz() -> None:
    """Fuzz the SEV firmware the way a hostile host could."""


@fuzz.command("mailbox")
@click.option("--cases", default=10_000, show_default=True, type=click.IntRange(1))
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Cases are reproducible per seed."
)
@profile_option()
@json_option
def mailbox_cmd(cases: int, seed: int, profile_name: str, as_json: bool) -> None:
    """Mutated command buffers, every command id (valid, unknown, SNP), hostile buffer
    addresses, in every state the world gets into. Exit code 1 if any invariant broke:
    a command without a spec status, an internal firmware error, a state outside the
    spec's tables, two guests on one ASID, or a guest changed by a command that did not
    name it."""
    start = time.perf_counter()
    fuzzer = MailboxFuzzer(seed=seed, profile=get_profile(profile_name))
    try:
        with _progress(as_json) as progress:
            task = progress.add_task("cases", total=cases)
            report = fuzzer.run(cases, lambda done: progress.update(task, completed=done))
    finally:
        fuzzer.close()
    out = report.to_json() | {
        "profile": profile_name,
        "seconds": round(time.perf_counter() - start, 1),
    }
    summary = (
        f"{report.cases} cases, {out['distinct_commands']} command ids, {report.rebuilds} "
        f"platform rebuilds, {out['seconds']} s: {len(report.violations)} violations"
    )
    _finish(out, as_json, [summary], report.violations)


@fuzz.command("load")
@click.option("--cycles", default=5000, show_default=True, type=click.IntRange(1))
@click.option(
    "--alive", default=4, show_default=True, type=click.IntRange(1, 64), help="Guests at once."
)
@click.option(
    "--asids",
    default=8,
    show_default=True,
    type=click.IntRange(2, 500),
    help="ASIDs the BIOS leaves for plain SEV guests (few: KVM recycles often).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def load_cmd(cycles: int, alive: int, asids: int, seed: int, as_json: bool) -> None:
    """Launch, run and tear down guests on milan, several alive at once, exhausting and
    recycling ASIDs. Exit code 1 if the firmware accepted ACTIVATE of a dirty ASID, a
    recycle failed or a guest did not run."""
    if alive > asids:
        raise click.BadParameter(
            "cannot keep more guests alive than there are ASIDs", param_hint="--alive"
        )
    start = time.perf_counter()
    with _progress(as_json) as progress:
        task = progress.add_task("cycles", total=cycles)
        out = asid_load(
            cycles, alive, asids, seed, lambda done: progress.update(task, completed=done)
        )
    out["seconds"] = round(time.perf_counter() - start, 1)
    summary = (
        f"{out['cycles']} cycles, {out['activations']} ACTIVATEs, {out['recycles']} "
        f"recycles (WBINVD + DF_FLUSH), RSS {out['rss_mib_after_warmup']} -> "
        f"{out['rss_mib_at_end']} MiB, {out['seconds']} s: {len(out['violations'])} violations"
    )
    _finish(out, as_json, [summary], out["violations"])


@fuzz.command("tamper")
@click.option(
    "--sample",
    default=10_000,
    show_default=True,
    type=click.IntRange(1),
    help="Flips per structure larger than this (smaller ones: every bit).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(
        [
            "session",
            "godh",
            "secret-header",
            "secret-payload",
            "packet-header",
            "packet-payload",
            "chain",
            "snapshot",
        ]
    ),
    help="Only these structures (repeatable).",
)
@json_option
def tamper_cmd(sample: int, seed: int, only: tuple[str, ...], as_json: bool) -> None:
    """Flip single bits of everything that crosses the host — the owner's session blob
    and GODH certificate, a LAUNCH_SECRET packet, a migration packet, a certificate chain
    — and check each flip is refused without changing the guest it was aimed at. Flips
    a format ignores (unused bytes) are reported with their offsets. Exit code 1 on a
    violation."""
    start = time.perf_counter()
    with _progress(as_json) as progress:
        task = progress.add_task("flips", total=None)
        out = tamper.campaign(
            sample,
            seed,
            set(only) or None,
            lambda name, done, total: progress.update(task, description=name, completed=done),
        )
    violations = [f"VIOLATION {v}" for t in out.values() for v in t["violations"]]
    summary = []
    for name, t in out.items():
        ranges = t["accepted_byte_ranges"]
        shown = ", ".join(ranges[:6]) + (f" … ({len(ranges)} ranges)" if len(ranges) > 6 else "")
        summary.append(
            f"{name:15} {t['tried']:6} of {t['bits']:6} bits flipped: {t['rejected']} refused"
            + (f", {t['accepted']} ignored at bytes {shown}" if t["accepted"] else "")
        )
    seconds = round(time.perf_counter() - start, 1)
    _finish(out | {"seconds": seconds}, as_json, summary, violations)


@fuzz.command("leaks")
@click.option(
    "--part",
    "parts",
    multiple=True,
    type=click.Choice(["demo", "attacks", "tamper", "qmp"]),
    help="Scenarios to run (repeatable) [default: all].",
)
@click.option("--seed", default=5, show_default=True, type=int)
@json_option
def leaks_cmd(parts: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Run the demo, every attack, a tamper campaign and a VM driven over QMP (secret,
    snapshot, restore) while recording every key the
    firmware and the memory controller create, then search DRAM (raw and as the host
    reads it), outputs, logs, written files and migration streams for them. Exit code 1
    on any hit."""
    from sevsim.leakscan import scan_scenarios

    start = time.perf_counter()
    with Console(stderr=True).status("running the scenarios and scanning", spinner="dots"):
        report = scan_scenarios(parts or ("demo", "attacks", "tamper", "qmp"), seed)
    out = report.to_json() | {"seconds": round(time.perf_counter() - start, 1)}
    summary = (
        f"{sum(report.keys.values())} keys recorded, {report.machines} machines' DRAM "
        f"({report.dram_bytes >> 20} MiB raw + host view) and {report.other_bytes} bytes of "
        f"output scanned, {out['seconds']} s: {len(report.hits)} hits"
    )
    _finish(out, as_json, [summary], report.hits)
